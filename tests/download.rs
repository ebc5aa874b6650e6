//! Finding and downloading data sets, against an HTTP server on loopback that this test starts:
//! a good download and the cache it fills, a corrupt body (retried, then refused), a truncated
//! body, a server that is not there, and the order in which folders are looked for.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use recycle::data::download::{sha256_file, ATTEMPTS};
use recycle::data::locate::{locate_in, Places};
use recycle::data::sources::{DataSource, RemoteFile, FASHION_MNIST, FORTUNES};
use recycle::data::test_support::{write_fashion_mnist, write_fortunes};
use recycle::data::{load_fashion_mnist, load_fortunes, Split};

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("recycle-download-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the server does for a path.
#[derive(Clone)]
enum Reply {
    /// 200 with these bytes.
    Body(Vec<u8>),
    /// 200 with these bytes the first `n` times, then the second body.
    FirstThen(usize, Vec<u8>, Vec<u8>),
    /// A Content-Length of the full size, then only the first half, then the connection closes.
    Truncated(Vec<u8>),
}

/// An HTTP/1.1 server on 127.0.0.1 that answers GETs from a table, one connection at a time,
/// and counts the requests per path. It serves at most 200 connections and stops when dropped.
struct Server {
    addr: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(table: HashMap<String, Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming().take(200) {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &table, &h);
                }
            }
        });
        Server {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn base(&self) -> String {
        format!("http://{}/files/", self.addr)
    }

    fn hits(&self, name: &str) -> usize {
        let hits = self.hits.lock().unwrap();
        hits.get(&format!("/files/{name}")).copied().unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut conn: TcpStream,
    table: &HashMap<String, Reply>,
    hits: &Mutex<HashMap<String, usize>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    let n = {
        let mut hits = hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let head = |len: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    match table.get(&path) {
        None => conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
        Some(Reply::Body(b)) => {
            conn.write_all(head(b.len()).as_bytes())?;
            conn.write_all(b)?;
        }
        Some(Reply::FirstThen(k, first, then)) => {
            let b = if n <= *k { first } else { then };
            conn.write_all(head(b.len()).as_bytes())?;
            conn.write_all(b)?;
        }
        Some(Reply::Truncated(b)) => {
            conn.write_all(head(b.len()).as_bytes())?;
            conn.write_all(&b[..b.len() / 2])?;
        }
    }
    conn.flush()?;
    conn.shutdown(std::net::Shutdown::Both)
}

/// A data source made of the files in `dir` (their real sizes and checksums), published under
/// whatever base URL a test gives.
fn source_of(dir: &Path, title: &'static str, env: &'static str) -> DataSource {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let files: Vec<RemoteFile> = names
        .iter()
        .map(|n| {
            let p = dir.join(n);
            RemoteFile {
                name: Box::leak(n.clone().into_boxed_str()),
                size: std::fs::metadata(&p).unwrap().len(),
                sha256: Box::leak(sha256_file(&p).unwrap().into_boxed_str()),
            }
        })
        .collect();
    DataSource {
        title,
        cache_name: title,
        dir_env: env,
        base_url_env: "RECYCLE_TEST_UNUSED_URL",
        base_url: "http://127.0.0.1:9/never-used/",
        system_dir: "/nonexistent-system-dir",
        system_package: "none",
        system_markers: &[],
        files: Box::leak(files.into_boxed_slice()),
    }
}

/// Places with no environment folder, no system folder, the given cache and server.
fn places(cache: &Path, base_url: String) -> Places {
    Places {
        env_dir: None,
        system_dir: None,
        cache: Some(cache.to_path_buf()),
        base_url,
        progress: false,
    }
}

/// The file table of a server publishing every file of `source` from `dir`.
fn table_of(source: &DataSource, dir: &Path) -> HashMap<String, Reply> {
    source
        .files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(f.name)).unwrap();
            (format!("/files/{}", f.name), Reply::Body(bytes))
        })
        .collect()
}

/// Every entry of a folder, hidden ones included.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn fashion_fixture(root: &Path) -> (PathBuf, DataSource) {
    let upstream = root.join("upstream");
    write_fashion_mnist(&upstream, 40, 20).unwrap();
    let source = source_of(&upstream, "fmnist-test", "RECYCLE_FASHION_MNIST_DIR");
    (upstream, source)
}

#[test]
fn a_download_fills_the_cache_and_a_second_run_needs_no_network() {
    let root = scratch("good");
    let (upstream, source) = fashion_fixture(&root);
    let cache = root.join("cache");
    let server = Server::start(table_of(&source, &upstream));

    let dir = locate_in(&source, None, &places(&cache, server.base())).unwrap();
    assert_eq!(dir, cache.join("fmnist-test"));
    for f in source.files {
        assert_eq!(server.hits(f.name), 1, "{}", f.name);
        assert_eq!(
            std::fs::read(dir.join(f.name)).unwrap(),
            std::fs::read(upstream.join(f.name)).unwrap()
        );
    }
    assert_eq!(entries(&dir), entries(&upstream), "no temporary file left");
    // The downloaded folder is a data set the loader reads.
    let ds = load_fashion_mnist(Some(&dir), Split::Train, None).unwrap();
    assert_eq!((ds.len(), ds.height, ds.width), (40, 28, 28));

    // Second run: the server is gone, the cache answers.
    let base = server.base();
    drop(server);
    assert_eq!(
        locate_in(&source, None, &places(&cache, base)).unwrap(),
        dir
    );

    // A file that went missing from the cache is fetched again, and only that one.
    let server = Server::start(table_of(&source, &upstream));
    std::fs::remove_file(dir.join(source.files[1].name)).unwrap();
    locate_in(&source, None, &places(&cache, server.base())).unwrap();
    assert_eq!(server.total_hits(), 1);
    assert_eq!(server.hits(source.files[1].name), 1);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_corrupt_body_is_retried_then_refused_and_nothing_is_kept() {
    let root = scratch("corrupt");
    let (upstream, source) = fashion_fixture(&root);
    let cache = root.join("cache");
    let victim = source.files[0];
    let mut table = table_of(&source, &upstream);
    let mut bad = std::fs::read(upstream.join(victim.name)).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    table.insert(format!("/files/{}", victim.name), Reply::Body(bad));
    let server = Server::start(table);

    let e = locate_in(&source, None, &places(&cache, server.base()))
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert_eq!(server.hits(victim.name), ATTEMPTS, "retried once");
    let url = format!("{}{}", server.base(), victim.name);
    assert!(e.contains(&url), "{e}");
    assert!(
        e.contains(victim.sha256),
        "names the expected checksum: {e}"
    );
    assert!(e.contains("SHA-256"), "{e}");
    assert!(
        e.contains("RECYCLE_FASHION_MNIST_DIR"),
        "says what to do: {e}"
    );
    assert!(
        e.contains(&cache.display().to_string()),
        "names the cache: {e}"
    );
    let dir = cache.join("fmnist-test");
    assert!(
        !entries(&dir).iter().any(|n| n.contains(victim.name)),
        "no partial or corrupt file: {:?}",
        entries(&dir)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_body_corrupt_once_is_fetched_again() {
    let root = scratch("corrupt-once");
    let (upstream, source) = fashion_fixture(&root);
    let cache = root.join("cache");
    let victim = source.files[2];
    let good = std::fs::read(upstream.join(victim.name)).unwrap();
    let mut bad = good.clone();
    bad[10] ^= 1;
    let mut table = table_of(&source, &upstream);
    table.insert(
        format!("/files/{}", victim.name),
        Reply::FirstThen(1, bad, good.clone()),
    );
    let server = Server::start(table);
    let dir = locate_in(&source, None, &places(&cache, server.base())).unwrap();
    assert_eq!(server.hits(victim.name), 2);
    assert_eq!(std::fs::read(dir.join(victim.name)).unwrap(), good);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_truncated_body_is_refused() {
    let root = scratch("truncated");
    let (upstream, source) = fashion_fixture(&root);
    let cache = root.join("cache");
    let victim = source.files[0];
    let mut table = table_of(&source, &upstream);
    let bytes = std::fs::read(upstream.join(victim.name)).unwrap();
    table.insert(format!("/files/{}", victim.name), Reply::Truncated(bytes));
    // A body shorter than the pinned size, sent complete (Content-Length agrees with it).
    let short = source.files[1];
    let mut cut = std::fs::read(upstream.join(short.name)).unwrap();
    cut.truncate(cut.len() - 3);
    table.insert(format!("/files/{}", short.name), Reply::Body(cut));
    let server = Server::start(table);

    let e = locate_in(&source, None, &places(&cache, server.base()))
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert_eq!(server.hits(victim.name), ATTEMPTS);
    assert!(e.contains(victim.name), "{e}");
    assert!(
        e.contains(&format!("{} bytes", victim.size)),
        "says how much arrived of what: {e}"
    );
    let dir = cache.join("fmnist-test");
    assert!(entries(&dir).iter().all(|n| !n.starts_with('.')));

    // The short one, on its own.
    let mut only_short = source;
    only_short.files = Box::leak(vec![short].into_boxed_slice());
    let e = locate_in(&only_short, None, &places(&cache, server.base()))
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert!(
        e.contains(&format!(
            "ended after {} of the expected {} bytes",
            short.size - 3,
            short.size
        )),
        "{e}"
    );
    assert!(!dir.join(short.name).exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn no_server_is_a_clear_offline_error() {
    let root = scratch("offline");
    let (_, source) = fashion_fixture(&root);
    let cache = root.join("cache");
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/files/");
    let start = std::time::Instant::now();
    let e = locate_in(&source, None, &places(&cache, base.clone()))
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(
        e.contains(&format!("{base}{}", source.files[0].name)),
        "{e}"
    );
    assert!(e.contains("RECYCLE_FASHION_MNIST_DIR"), "{e}");
    assert!(e.contains(&cache.display().to_string()), "{e}");
    assert!(e.contains("network"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_folder_given_then_the_variable_then_debian_then_the_cache() {
    let root = scratch("order");
    let (upstream, mut source) = fashion_fixture(&root);
    let names: Vec<&'static str> = source.files.iter().map(|f| f.name).collect();
    source.system_markers = Box::leak(names.into_boxed_slice());
    let cache = root.join("cache");
    let system = root.join("system");
    std::fs::create_dir_all(&system).unwrap();
    let given = root.join("given");
    let env = root.join("env");
    // Nothing listens on the discard port: any download attempt fails.
    let mut p = places(&cache, "http://127.0.0.1:9/files/".into());
    p.system_dir = Some(system.clone());

    // An empty system folder does not count, so the cache is tried (and fails offline).
    assert!(locate_in(&source, None, &p).is_err());
    // A complete one does.
    write_fashion_mnist(&system, 40, 20).unwrap();
    assert_eq!(locate_in(&source, None, &p).unwrap(), system);
    // The variable's folder comes first, even when empty (it is the user's word).
    p.env_dir = Some(env.clone());
    assert_eq!(locate_in(&source, None, &p).unwrap(), env);
    // And the folder given comes before everything.
    assert_eq!(locate_in(&source, Some(&given), &p).unwrap(), given);
    // Neither is downloaded into.
    assert!(!env.exists() && !given.exists());
    // A complete cache is used without the network.
    p.env_dir = None;
    p.system_dir = None;
    let cached = cache.join("fmnist-test");
    write_fashion_mnist(&cached, 40, 20).unwrap();
    assert_eq!(entries(&cached), entries(&upstream));
    assert_eq!(locate_in(&source, None, &p).unwrap(), cached);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn many_small_files_download_into_a_fortunes_folder() {
    let root = scratch("text");
    let upstream = root.join("upstream");
    write_fortunes(&upstream, 1000).unwrap();
    let source = source_of(&upstream, "text-test", "RECYCLE_TEXT_DIR");
    assert!(source.files.len() > 4);
    let cache = root.join("cache");
    let server = Server::start(table_of(&source, &upstream));
    let dir = locate_in(&source, None, &places(&cache, server.base())).unwrap();
    assert_eq!(server.total_hits(), source.files.len());
    assert_eq!(
        load_fortunes(Some(&dir)).unwrap(),
        load_fortunes(Some(&upstream)).unwrap()
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_pinned_sources_are_well_formed() {
    for source in [FASHION_MNIST, FORTUNES] {
        assert!(!source.files.is_empty());
        for f in source.files {
            assert_eq!(f.sha256.len(), 64, "{}", f.name);
            assert!(f
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(f.size > 0 && !f.name.contains('/'));
        }
        let mut names: Vec<_> = source.files.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), source.files.len(), "{}", source.title);
    }
    // The loader's file names are the published ones.
    for split in ["train", "t10k"] {
        for kind in ["images-idx3", "labels-idx1"] {
            let name = format!("{split}-{kind}-ubyte.gz");
            assert!(FASHION_MNIST.files.iter().any(|f| f.name == name), "{name}");
        }
    }
    assert_eq!(FASHION_MNIST.total_size(), 30_878_645);
    assert!(FASHION_MNIST.base_url.starts_with("http://"));
    assert!(FORTUNES.base_url.starts_with("https://"));
}
