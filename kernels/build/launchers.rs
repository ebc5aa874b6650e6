//! Reads the `extern "C" __global__` entry points of every `src/<family>.cu` and writes one
//! typed Rust launcher per kernel, plus the table of every kernel's signature: the `.cu` files
//! are the only place a kernel's parameter list is written.
//!
//! What is understood: C comments and line continuations; entry points at file level; entry
//! points inside a `#define M(A, B, ...)` body, expanded for each `M(...)` line at file level. A
//! macro whose kernel names end in `##S` and that is instantiated exactly as `M(float, f32)` and
//! `M(bf16, bf16)` (in either order) gives one launcher generic over the storage type; any
//! other macro gives one launcher per instantiation, and, when its body has one entry point and
//! it is used more than once, an argument struct and a by-name launch over its kernels (see
//! `dispatch`). Parameter types: `[const] X*` with X one of `float`, `double`, `bf16`,
//! `int32_t`, `int`, `uint32_t`, `uint64_t` or the macro's storage type, and by value `float`,
//! `int32_t`, `int`, `uint32_t`, `uint64_t`, and `TeacherLogits`, whose `struct` the same file
//! defines (pointer fields only: written as device addresses). Anything else stops the build
//! with the file, the kernel and the parameter. A family's file-level integer constants,
//! `#define RK_NAME <integer>`, become `pub const NAME: usize`: the host's limits come from
//! the kernels' own source.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One parameter: its name and C type as written (`const T*`, `uint32_t`).
#[derive(Clone, Debug)]
pub struct CParam {
    pub name: String,
    pub ty: String,
}

/// One entry point as written in the source.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    params: Vec<CParam>,
}

/// A launcher to write: generic over the storage type `generic` (a macro's parameter name) or
/// concrete (`None`), its Rust name and, per concrete kernel, the name and C parameters.
pub struct Launcher {
    family: String,
    rust_name: String,
    generic: Option<String>,
    params: Vec<CParam>,
    /// `(kernel name, storage suffix)`; one entry for a concrete launcher.
    kernels: Vec<(String, &'static str)>,
    /// The macro whose one entry point this kernel instantiates, when the macro is used for
    /// several kernels: they share one argument struct and a by-name launch.
    dispatch: Option<String>,
}

/// What the generator reads from one family's file.
pub struct Family {
    pub launchers: Vec<Launcher>,
    pub kernels: Vec<Kernel>,
    /// `#define RK_NAME <integer>` at file level: `(NAME, value)`.
    pub constants: Vec<(String, u64)>,
    /// The structs its kernels take by value.
    pub structs: Vec<CStruct>,
}

/// A struct a kernel takes by value: its name and fields `(name, array length as written)`,
/// every field a pointer.
pub struct CStruct {
    pub name: String,
    pub fields: Vec<(String, Option<String>)>,
}

/// Every concrete kernel of a family, with its parameters (storage types substituted).
pub struct Kernel {
    pub family: String,
    pub name: String,
    pub params: Vec<CParam>,
}

fn fail(file: &str, msg: impl std::fmt::Display) -> ! {
    panic!("recycle-kernels: cannot generate the launchers from src/{file}.cu: {msg}")
}

/// C translation phases 2 and 3: splice continued lines, then drop comments.
fn preprocess(src: &str) -> String {
    let spliced = src.replace("\\\r\n", " ").replace("\\\n", " ");
    let mut out = String::with_capacity(spliced.len());
    let b = spliced.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
            out.push(' ');
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The text between the parenthesis at `open` and its match.
fn parenthesised<'a>(file: &str, text: &'a str, open: usize) -> &'a str {
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    fail(
        file,
        format!("unbalanced parentheses after {:?}", &text[open..]),
    )
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect()
}

/// Every `extern "C" __global__ void name(params)` in `text`.
fn entries(file: &str, text: &str) -> Vec<Entry> {
    const MARK: &str = "extern \"C\" __global__ void";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let open = after
            .find('(')
            .unwrap_or_else(|| fail(file, format!("no parameter list after {after:.60}")));
        let name: String = after[..open].split_whitespace().collect();
        let list = parenthesised(file, after, open);
        let params = split_list(list)
            .iter()
            .map(|p| param(file, &name, p))
            .collect();
        out.push(Entry { name, params });
        rest = &after[open + list.len()..];
    }
    out
}

/// `const float* x` → `("x", "const float*")`.
fn param(file: &str, kernel: &str, text: &str) -> CParam {
    let spaced = text.replace('*', "* ");
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let Some((name, ty)) = words.split_last() else {
        fail(file, format!("{kernel}: an empty parameter"))
    };
    let ok_name = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !ty.is_empty();
    if !ok_name {
        fail(
            file,
            format!("{kernel}: cannot read the parameter `{text}` as `<type> <name>`"),
        );
    }
    CParam {
        name: name.to_string(),
        ty: ty.join(" ").replace(" *", "*"),
    }
}

/// A `#define NAME(args) body` of the file.
struct Macro {
    params: Vec<String>,
    body: String,
}

/// Replaces whole identifiers `from` by `to`, and `##from` by `to` glued to what precedes.
fn substitute(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut i = 0;
    let chars: Vec<char> = text.chars().collect();
    while i < chars.len() {
        let starts = !(i > 0 && ident(chars[i - 1]));
        let matches = text_at(&chars, i, from);
        let ends = chars
            .get(i + from.chars().count())
            .is_none_or(|c| !ident(*c));
        if starts && matches && ends {
            if out.ends_with("##") {
                out.truncate(out.len() - 2);
                while out.ends_with(' ') {
                    out.pop();
                }
            }
            out.push_str(to);
            i += from.chars().count();
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn text_at(chars: &[char], i: usize, s: &str) -> bool {
    s.chars()
        .enumerate()
        .all(|(j, c)| chars.get(i + j) == Some(&c))
}

/// `1024`, `0x10`, `8u` as a number.
fn integer(text: &str) -> Option<u64> {
    let t = text.trim_end_matches(['u', 'U', 'l', 'L']);
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// `struct name { const void* p[N]; ... };` in `text`, if the file defines it.
fn c_struct(file: &str, text: &str, name: &str) -> Option<CStruct> {
    let at = text.find(&format!("struct {name} {{"))?;
    let body = &text[at..];
    let body = &body[body.find('{')? + 1..body.find('}')?];
    let fields = body
        .split(';')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            let (decl, len) = match f.split_once('[') {
                Some((d, rest)) => (d, Some(rest.trim_end_matches(']').trim().to_string())),
                None => (f, None),
            };
            let p = param(file, name, decl);
            if !p.ty.ends_with('*') {
                fail(
                    file,
                    format!(
                        "struct {name}: field `{f}` is not a pointer (the generator writes \
                         pointer fields only)"
                    ),
                );
            }
            (p.name, len)
        })
        .collect();
    Some(CStruct {
        name: name.to_string(),
        fields,
    })
}

/// The launchers, kernels, constants and by-value structs of one family's source.
pub fn family(file: &str, src: &str) -> Family {
    let text = preprocess(src);
    let mut macros: BTreeMap<String, Macro> = BTreeMap::new();
    let mut top = String::new();
    let mut instances: Vec<(String, Vec<String>)> = Vec::new();
    let mut constants = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(def) = t.strip_prefix("#define") {
            let def = def.trim_start();
            let name_end = def
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(def.len());
            let name = &def[..name_end];
            let value = def[name_end..].trim();
            if let (Some(rust), Some(v)) = (name.strip_prefix("RK_"), integer(value)) {
                constants.push((rust.to_string(), v));
            }
            if def[name_end..].starts_with('(') {
                let args = parenthesised(file, def, name_end);
                let body = def[name_end + args.len() + 2..].to_string();
                macros.insert(
                    name.to_string(),
                    Macro {
                        params: split_list(args),
                        body,
                    },
                );
            }
            continue;
        }
        let call = t.trim_end_matches(';');
        if let Some(open) = call.find('(') {
            let name = &call[..open];
            if macros.contains_key(name) && call.ends_with(')') {
                let args = split_list(parenthesised(file, call, open));
                instances.push((name.to_string(), args));
                continue;
            }
        }
        top.push_str(line);
        top.push('\n');
    }
    let mut launchers = Vec::new();
    let mut kernels = Vec::new();
    for e in entries(file, &top) {
        for p in &e.params {
            rust_type(file, &e.name, p, None);
        }
        kernels.push(Kernel {
            family: file.to_string(),
            name: e.name.clone(),
            params: e.params.clone(),
        });
        launchers.push(Launcher {
            family: file.to_string(),
            rust_name: e.name.clone(),
            generic: None,
            params: e.params,
            kernels: vec![(e.name, "")],
            dispatch: None,
        });
    }
    for (mname, m) in &macros {
        let uses: Vec<&Vec<String>> = instances
            .iter()
            .filter(|(n, _)| n == mname)
            .map(|(_, a)| a)
            .collect();
        let raw = entries(file, &m.body);
        if raw.is_empty() {
            continue;
        }
        if uses.is_empty() {
            fail(
                file,
                format!("the macro {mname} defines kernels but is never used"),
            );
        }
        for args in &uses {
            if args.len() != m.params.len() {
                fail(
                    file,
                    format!("{mname} takes {} arguments, given {args:?}", m.params.len()),
                );
            }
        }
        match storage_generic(m, &uses) {
            Some((ty_param, suffix_param)) => {
                for e in &raw {
                    let base = e
                        .name
                        .strip_suffix(&format!("##{suffix_param}"))
                        .map(str::trim);
                    let Some(base) = base else {
                        fail(
                            file,
                            format!(
                                "{mname}: kernel {} does not end in ##{suffix_param}",
                                e.name
                            ),
                        )
                    };
                    for p in &e.params {
                        rust_type(file, &e.name, p, Some(ty_param));
                    }
                    let mut names = Vec::new();
                    for (suffix, c) in [("f32", "float"), ("bf16", "bf16")] {
                        let name = format!("{base}{suffix}");
                        let params = e
                            .params
                            .iter()
                            .map(|p| CParam {
                                name: p.name.clone(),
                                ty: substitute(&p.ty, ty_param, c),
                            })
                            .collect();
                        kernels.push(Kernel {
                            family: file.to_string(),
                            name: name.clone(),
                            params,
                        });
                        names.push((name, suffix));
                    }
                    launchers.push(Launcher {
                        family: file.to_string(),
                        rust_name: base.trim_end_matches('_').to_string(),
                        generic: Some(ty_param.to_string()),
                        params: e.params.clone(),
                        kernels: names,
                        dispatch: None,
                    });
                }
            }
            None => {
                let dispatch = (raw.len() == 1 && uses.len() > 1).then(|| mname.clone());
                for args in &uses {
                    let mut body = m.body.clone();
                    for (p, a) in m.params.iter().zip(args.iter()) {
                        body = substitute(&body, p, a);
                    }
                    for e in entries(file, &body) {
                        for p in &e.params {
                            rust_type(file, &e.name, p, None);
                        }
                        kernels.push(Kernel {
                            family: file.to_string(),
                            name: e.name.clone(),
                            params: e.params.clone(),
                        });
                        launchers.push(Launcher {
                            family: file.to_string(),
                            rust_name: e.name.clone(),
                            generic: None,
                            params: e.params,
                            kernels: vec![(e.name, "")],
                            dispatch: dispatch.clone(),
                        });
                    }
                }
            }
        }
    }
    if kernels.is_empty() {
        fail(file, "no `extern \"C\" __global__ void` entry point");
    }
    let by_value = kernels
        .iter()
        .flat_map(|k| &k.params)
        .any(|p| p.ty == "TeacherLogits");
    let structs = match by_value {
        true => vec![c_struct(file, &text, "TeacherLogits").unwrap_or_else(|| {
            fail(
                file,
                "a kernel takes TeacherLogits by value but the file defines no struct TeacherLogits",
            )
        })],
        false => Vec::new(),
    };
    Family {
        launchers,
        kernels,
        constants,
        structs,
    }
}

/// `(type parameter, suffix parameter)` when the macro is instantiated exactly for
/// `(float, f32)` and `(bf16, bf16)` and names its kernels `..._##suffix`.
fn storage_generic<'a>(m: &'a Macro, uses: &[&Vec<String>]) -> Option<(&'a str, &'a str)> {
    if uses.len() != 2 || m.params.len() != 2 {
        return None;
    }
    let (t, s) = (&m.params[0], &m.params[1]);
    let mut pairs: Vec<(&str, &str)> = uses
        .iter()
        .map(|a| (a[0].as_str(), a[1].as_str()))
        .collect();
    pairs.sort();
    let named = m.body.contains(&format!("##{s}"));
    (pairs == [("bf16", "bf16"), ("float", "f32")] && named).then_some((t.as_str(), s.as_str()))
}

/// The Rust type of a parameter, or a build failure naming it. `generic`: the macro's storage
/// type parameter, written `T` in Rust.
fn rust_type(file: &str, kernel: &str, p: &CParam, generic: Option<&str>) -> String {
    let ty = p.ty.strip_prefix("const ").unwrap_or(&p.ty);
    let (base, pointer) = match ty.strip_suffix('*') {
        Some(b) => (b.trim(), true),
        None => (ty, false),
    };
    let scalar = match base {
        "float" => Some("f32"),
        "double" if pointer => Some("f64"),
        "bf16" if pointer => Some("::half::bf16"),
        "int32_t" | "int" => Some("i32"),
        "uint32_t" => Some("u32"),
        "uint64_t" => Some("u64"),
        "TeacherLogits" if !pointer => Some("crate::launchers::TeacherLogits"),
        b if pointer && Some(b) == generic => Some("T"),
        _ => None,
    };
    match (scalar, pointer) {
        (Some(s), true) => format!("crate::call::Ptr<{s}>"),
        (Some(s), false) => s.to_string(),
        (None, _) => fail(
            file,
            format!(
                "{kernel}: parameter `{}` has the type `{}`, which the launcher generator does \
                 not know (see kernels/build/launchers.rs for the types it reads)",
                p.name, p.ty
            ),
        ),
    }
}

/// How the launcher passes a parameter: `Value::U64(x.addr())` and the like.
fn value_expr(p: &CParam, rust: &str) -> String {
    let n = rust_ident(&p.name);
    if rust.starts_with("crate::call::Ptr<") {
        format!("crate::call::Value::U64({n}.addr())")
    } else {
        match rust {
            "u64" => format!("crate::call::Value::U64({n})"),
            "u32" => format!("crate::call::Value::U32({n})"),
            "i32" => format!("crate::call::Value::I32({n})"),
            "f32" => format!("crate::call::Value::F32({n})"),
            _ => format!("crate::call::Value::Teachers({n})"),
        }
    }
}

fn rust_ident(name: &str) -> String {
    match name {
        "type" | "ref" | "mod" | "fn" | "loop" | "move" | "match" | "in" | "use" | "where"
        | "box" | "final" => format!("r#{name}"),
        _ => name.to_string(),
    }
}

/// The constants and by-value structs of every family.
fn declarations(m: &mut String, families: &[(String, Family)]) {
    let mut seen = BTreeMap::new();
    for (f, fam) in families {
        for (name, value) in &fam.constants {
            if let Some(other) = seen.insert(name.clone(), f) {
                fail(f, format!("RK_{name} is defined in src/{other}.cu too"));
            }
            writeln!(
                m,
                "/// `RK_{name}` of `src/{f}.cu`.\npub const {name}: usize = {value};\n"
            )
            .unwrap();
        }
        for s in &fam.structs {
            writeln!(
                m,
                "/// `struct {}` of `src/{f}.cu`, passed by value; a pointer is a device address.\n#[repr(C)]\n#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]\npub struct {} {{",
                s.name, s.name
            )
            .unwrap();
            for (field, len) in &s.fields {
                let ty = match len {
                    None => "u64".to_string(),
                    Some(l) => {
                        let l = l.strip_prefix("RK_").unwrap_or(l);
                        if integer(l).is_none() && !fam.constants.iter().any(|(c, _)| c == l) {
                            fail(
                                f,
                                format!(
                                    "struct {}: array length {l} is not a constant of the file",
                                    s.name
                                ),
                            );
                        }
                        format!("[u64; {l}]")
                    }
                };
                writeln!(m, "    pub {}: {ty},", rust_ident(field)).unwrap();
            }
            m.push_str("}\n\n");
        }
    }
}

/// The generated module: the families' constants and by-value structs, `FAMILIES`,
/// `SIGNATURES` and one launcher per kernel (generic ones over `T: Float`).
pub fn module(families: &[(String, Family)]) -> String {
    let mut m =
        String::from("// Generated by kernels/build.rs from the `.cu` files; do not edit.\n\n");
    declarations(&mut m, families);
    m.push_str("/// Every family and its kernels, in build order.\npub static FAMILIES: &[(&str, &[&str])] = &[\n");
    for (f, fam) in families {
        let names: Vec<String> = fam
            .kernels
            .iter()
            .map(|k| format!("{:?}", k.name))
            .collect();
        writeln!(m, "    ({f:?}, &[{}]),", names.join(", ")).unwrap();
    }
    m.push_str("];\n\n/// Every kernel's parameters as its `.cu` file declares them.\npub static SIGNATURES: &[crate::call::Signature] = &[\n");
    for (_, fam) in families {
        for k in &fam.kernels {
            let ps: Vec<String> = k
                .params
                .iter()
                .map(|p| format!("({:?}, {:?})", p.name, p.ty))
                .collect();
            writeln!(
                m,
                "    crate::call::Signature {{ kernel: {:?}, family: {:?}, params: &[{}] }},",
                k.name,
                k.family,
                ps.join(", ")
            )
            .unwrap();
        }
    }
    m.push_str("];\n");
    for (_, fam) in families {
        let ls = &fam.launchers;
        for l in ls {
            let generic = l.generic.as_deref();
            let file = l.family.as_str();
            let typed: Vec<(String, String)> = l
                .params
                .iter()
                .map(|p| {
                    (
                        rust_ident(&p.name),
                        rust_type(file, &l.rust_name, p, generic),
                    )
                })
                .collect();
            let args: Vec<String> = typed.iter().map(|(n, t)| format!("{n}: {t}")).collect();
            let values: Vec<String> = l
                .params
                .iter()
                .zip(&typed)
                .map(|(p, (_, t))| value_expr(p, t))
                .collect();
            let c_sig: Vec<String> = l
                .params
                .iter()
                .map(|p| format!("{} {}", p.ty, p.name))
                .collect();
            let (gen, kernel) = match generic {
                Some(_) => (
                    "<T: crate::call::Float>",
                    format!("T::pick({:?}, {:?})", l.kernels[0].0, l.kernels[1].0),
                ),
                None => ("", format!("{:?}", l.kernels[0].0)),
            };
            let doc_kernels: Vec<String> =
                l.kernels.iter().map(|(k, _)| format!("`{k}`")).collect();
            writeln!(
                m,
                "\n/// {} (`src/{file}.cu`): `({})`.\npub fn {}{gen}(config: crate::launch::LaunchConfig, {}) -> crate::call::KernelCall {{\n    crate::call::KernelCall::new({kernel}, {file:?}, config, vec![{}])\n}}",
                doc_kernels.join(" / "),
                c_sig.join(", "),
                l.rust_name,
                args.join(", "),
                values.join(", ")
            )
            .unwrap();
        }
        let mut groups: BTreeMap<&str, Vec<&Launcher>> = BTreeMap::new();
        for l in ls {
            if let Some(d) = &l.dispatch {
                groups.entry(d).or_default().push(l);
            }
        }
        for (mname, group) in groups {
            dispatch(&mut m, mname, &group);
        }
    }
    m
}

/// For the kernels one macro instantiates (`RK_KD_ROW`): the argument struct `KdRowArgs` with
/// the `.cu` parameter names, the list `KD_ROW_KERNELS` and the by-name launch `kd_row_call`.
/// A pointer whose pointee differs between the kernels (the storage type the kernel's name
/// says) is a plain device address (`u64`).
fn dispatch(m: &mut String, mname: &str, group: &[&Launcher]) {
    let file = group[0].family.as_str();
    let Some(base) = mname.strip_prefix("RK_") else {
        fail(
            file,
            format!("{mname}: a kernel macro's name starts with RK_"),
        )
    };
    let snake = base.to_ascii_lowercase();
    let camel: String = snake
        .split('_')
        .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
        .collect();
    let typed = |l: &Launcher| -> Vec<String> {
        l.params
            .iter()
            .map(|p| rust_type(file, &l.rust_name, p, None))
            .collect()
    };
    let first = typed(group[0]);
    let mut fields: Vec<String> = first.clone();
    for l in group {
        let names_agree = l.params.len() == group[0].params.len()
            && l.params
                .iter()
                .zip(&group[0].params)
                .all(|(a, b)| a.name == b.name);
        if !names_agree {
            fail(
                file,
                format!(
                    "{mname}: {} names its parameters unlike {}",
                    l.rust_name, group[0].rust_name
                ),
            );
        }
        for (i, t) in typed(l).into_iter().enumerate() {
            if t != first[i] {
                if !(t.starts_with("crate::call::Ptr<")
                    && first[i].starts_with("crate::call::Ptr<"))
                {
                    fail(
                        file,
                        format!(
                            "{mname}: parameter {} changes type between kernels",
                            l.params[i].name
                        ),
                    );
                }
                fields[i] = "u64".to_string();
            }
        }
    }
    let kernels: Vec<String> = group.iter().map(|l| format!("{:?}", l.rust_name)).collect();
    writeln!(
        m,
        "\n/// The kernels of `{mname}` (`src/{file}.cu`), which take [`{camel}Args`].\npub static {}_KERNELS: &[&str] = &[{}];",
        base,
        kernels.join(", ")
    )
    .unwrap();
    writeln!(
        m,
        "\n/// The arguments of every `{mname}` kernel (`src/{file}.cu`); a `u64` is the device address of the storage type the kernel's name says.\n#[derive(Debug, Clone, Copy)]\npub struct {camel}Args {{"
    )
    .unwrap();
    for (p, t) in group[0].params.iter().zip(&fields) {
        writeln!(m, "    pub {}: {t},", rust_ident(&p.name)).unwrap();
    }
    m.push_str("}\n");
    let args: Vec<String> = group[0]
        .params
        .iter()
        .zip(fields.iter().zip(&first))
        .map(|(p, (field, launcher))| {
            let n = rust_ident(&p.name);
            if field != launcher {
                format!("crate::call::Ptr::new(a.{n})")
            } else {
                format!("a.{n}")
            }
        })
        .collect();
    writeln!(
        m,
        "\n/// The launch of the `{mname}` kernel `kernel` through its typed launcher; another name is an error.\npub fn {snake}_call(kernel: &str, config: crate::launch::LaunchConfig, a: &{camel}Args) -> Result<crate::call::KernelCall, crate::call::UnknownKernel> {{\n    Ok(match kernel {{"
    )
    .unwrap();
    for l in group {
        writeln!(
            m,
            "        {:?} => {}(config, {}),",
            l.rust_name,
            l.rust_name,
            args.join(", ")
        )
        .unwrap();
    }
    writeln!(
        m,
        "        other => return Err(crate::call::UnknownKernel {{ kernel: other.to_string(), family: {:?} }}),\n    }})\n}}",
        format!("{mname} (src/{file}.cu)")
    )
    .unwrap();
}
