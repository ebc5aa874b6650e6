//! The launcher generator of `build.rs` (`build/launchers.rs`) on small sources: what it
//! reads, what it writes, and the build failures it gives for signatures it cannot read.

#[path = "../build/launchers.rs"]
#[allow(dead_code)]
mod launchers;

use std::panic;

const GENERIC: &str = r#"
// a comment with extern "C" __global__ void not_a_kernel(int x)
#define RK_TYPED(T, S)                                                     \
    /* out = x * s */                                                      \
    extern "C" __global__ void scale_##S(const T* x, T* out, uint64_t n,  \
                                         float s) {}
RK_TYPED(float, f32)
RK_TYPED(bf16, bf16)
extern "C" __global__ void reduce(const float* partial, uint32_t rows, double* out,
                                  int accumulate) {}
"#;

#[test]
fn a_family_macro_gives_one_generic_launcher_and_two_kernels() {
    let fam = launchers::family("demo", GENERIC);
    let ks = &fam.kernels;
    let names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["reduce", "scale_f32", "scale_bf16"]);
    let bf16 = &ks[2].params;
    assert_eq!(
        (bf16[0].name.as_str(), bf16[0].ty.as_str()),
        ("x", "const bf16*")
    );
    assert_eq!(bf16[3].ty, "float");
    let module = launchers::module(&[("demo".to_string(), fam)]);
    assert!(
        module.contains(
            "pub fn scale<T: crate::call::Float>(config: crate::launch::LaunchConfig, \
             x: crate::call::Ptr<T>, out: crate::call::Ptr<T>, n: u64, s: f32)"
        ),
        "{module}"
    );
    assert!(module.contains("T::pick(\"scale_f32\", \"scale_bf16\")"));
    assert!(module.contains(
        "pub fn reduce(config: crate::launch::LaunchConfig, partial: crate::call::Ptr<f32>, \
         rows: u32, out: crate::call::Ptr<f64>, accumulate: i32)"
    ));
    assert!(module.contains("(\"demo\", &[\"reduce\", \"scale_f32\", \"scale_bf16\"])"));
}

const CONSTANTS: &str = r#"
#define RK_MAX_THINGS 4
#define RK_MASK 0xffu
#define RK_HD __host__ __device__
struct Things {
    const void* p[RK_MAX_THINGS];
    float* extra;
};
struct TeacherLogits { const void* p[RK_MAX_THINGS]; };
extern "C" __global__ void take(TeacherLogits t, uint32_t k) {}
"#;

#[test]
fn integer_defines_and_by_value_structs_are_written_from_the_source() {
    let fam = launchers::family("demo", CONSTANTS);
    assert_eq!(
        fam.constants,
        [("MAX_THINGS".to_string(), 4), ("MASK".to_string(), 255)]
    );
    // Only the struct a kernel takes by value.
    assert_eq!(fam.structs.len(), 1);
    let module = launchers::module(&[("demo".to_string(), fam)]);
    assert!(
        module.contains("pub const MAX_THINGS: usize = 4;"),
        "{module}"
    );
    assert!(module.contains(
        "#[repr(C)]\n#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]\n\
         pub struct TeacherLogits {\n    pub p: [u64; MAX_THINGS],\n}"
    ));
    assert!(module.contains("t: crate::launchers::TeacherLogits, k: u32"));
}

/// The build's panic message for `src`.
fn failure(src: &str) -> String {
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let r = panic::catch_unwind(|| launchers::family("bad", src));
    panic::set_hook(hook);
    let e = r
        .err()
        .expect("the generator accepted a signature it should refuse");
    e.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn signatures_it_cannot_read_stop_the_build_with_the_file_kernel_and_parameter() {
    let e = failure(r#"extern "C" __global__ void k(const half* x, uint32_t n) {}"#);
    assert!(e.contains("src/bad.cu"), "{e}");
    assert!(
        e.contains("k: parameter `x` has the type `const half*`"),
        "{e}"
    );
    let e = failure(r#"extern "C" __global__ void k(float*) {}"#);
    assert!(e.contains("cannot read the parameter `float*`"), "{e}");
    let e = failure("__global__ void helper(float* x) {}");
    assert!(
        e.contains("no `extern \"C\" __global__ void` entry point"),
        "{e}"
    );
    let e = failure(
        "#define M(T, S) extern \"C\" __global__ void k_##S(T* x) {}\nM(float, f32)\nM(char, i8)\n",
    );
    assert!(
        e.contains("k_i8: parameter `x` has the type `char*`"),
        "{e}"
    );
    let e = failure(r#"extern "C" __global__ void k(TeacherLogits t) {}"#);
    assert!(e.contains("defines no struct TeacherLogits"), "{e}");
    let e = failure(
        "struct TeacherLogits { float w; };\nextern \"C\" __global__ void k(TeacherLogits t) {}",
    );
    assert!(e.contains("field `float w` is not a pointer"), "{e}");
}
