pub mod rendezvous;
