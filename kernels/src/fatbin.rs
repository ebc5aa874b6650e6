//! Reading the fatbins this crate embeds: their entries (one cubin per architecture and the
//! PTX), the kernels each entry defines, and which entry a given GPU would run.
//!
//! The container layout is NVIDIA's (undocumented but stable since CUDA 4, and what `cuobjdump`
//! reads): a 16-byte header (magic `0xBA55ED50`, version, header size, size of the entries),
//! then entries, each a header (kind 1 = PTX, 2 = ELF cubin; header size; payload size; the
//! `sm_XY` number at offset 28; flags at offset 40, where bits 0x2000 and 0x8000 mark a
//! compressed payload) followed by its payload. The build writes uncompressed fatbins, so every
//! payload is a plain ELF or PTX text.
//!
//! The engine uses this to say, before loading a module, whether the device has an image
//! ([`select`]); the mock CUDA, which kernels a module holds ([`kernel_names`]); the tests, that
//! every image defines every kernel the generated launchers name.

use std::fmt;

/// First four bytes (little-endian `u32`) of a fatbin.
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// First four bytes of an ELF file (a cubin).
pub const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

const FATBIN_HEADER_LEN: usize = 16;
const ENTRY_HEADER_MIN: usize = 64;
const FLAG_COMPRESSED: u64 = 0x2000 | 0x8000;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// PTX text for a virtual architecture (JIT-compiled by the driver).
    Ptx,
    /// An ELF cubin for one real architecture.
    Cubin,
    /// A kind this reader does not know.
    Other(u16),
}

/// One image in a fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub kind: EntryKind,
    /// `XY` of `sm_XY` (cubin) or `compute_XY` (PTX).
    pub arch: u32,
    /// Whether the payload is compressed (then [`kernel_names`] cannot read it).
    pub compressed: bool,
    pub payload: &'a [u8],
}

/// A fatbin or ELF that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatbinError(pub String);

impl fmt::Display for FatbinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed fatbin: {}", self.0)
    }
}

impl std::error::Error for FatbinError {}

fn err<T>(msg: impl Into<String>) -> Result<T, FatbinError> {
    Err(FatbinError(msg.into()))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Whether `data` starts like a fatbin.
pub fn is_fatbin(data: &[u8]) -> bool {
    u32_at(data, 0) == Some(FATBIN_MAGIC)
}

/// Every entry of a fatbin (of each container, when several are concatenated).
pub fn entries(data: &[u8]) -> Result<Vec<Entry<'_>>, FatbinError> {
    if !is_fatbin(data) {
        return err(format!(
            "does not start with the fatbin magic {FATBIN_MAGIC:#x} ({} bytes)",
            data.len()
        ));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        if u32_at(data, pos) != Some(FATBIN_MAGIC) {
            // Containers may be padded at the end.
            if data[pos..].iter().all(|&b| b == 0) {
                break;
            }
            return err(format!("no container header at offset {pos}"));
        }
        let header_len = u16_at(data, pos + 6).unwrap_or(0) as usize;
        let body_len = u64_at(data, pos + 8)
            .ok_or_else(|| FatbinError(format!("truncated container header at {pos}")))?
            as usize;
        if header_len < FATBIN_HEADER_LEN {
            return err(format!("container header of {header_len} bytes at {pos}"));
        }
        let body_start = pos + header_len;
        let body_end = body_start
            .checked_add(body_len)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                FatbinError(format!(
                    "container at {pos} claims {body_len} bytes, {} remain",
                    data.len() - body_start.min(data.len())
                ))
            })?;
        let mut e = body_start;
        while e < body_end {
            let h = &data[e..body_end];
            let (Some(kind), Some(h_len), Some(p_len), Some(arch), Some(flags)) = (
                u16_at(h, 0),
                u32_at(h, 4),
                u64_at(h, 8),
                u32_at(h, 28),
                u64_at(h, 40),
            ) else {
                return err(format!("truncated entry header at {e}"));
            };
            let (h_len, p_len) = (h_len as usize, p_len as usize);
            if h_len < ENTRY_HEADER_MIN || h_len.saturating_add(p_len) > h.len() {
                return err(format!(
                    "entry at {e}: header {h_len} + payload {p_len} bytes overrun the container"
                ));
            }
            out.push(Entry {
                kind: match kind {
                    1 => EntryKind::Ptx,
                    2 => EntryKind::Cubin,
                    k => EntryKind::Other(k),
                },
                arch,
                compressed: flags & FLAG_COMPRESSED != 0,
                payload: &h[h_len..h_len + p_len],
            });
            e += h_len + p_len;
        }
        pos = body_end;
    }
    Ok(out)
}

/// The entry a GPU of compute capability `sm` (e.g. 86 for 8.6) runs, as the driver picks it:
/// the cubin of the same major version with the highest minor not above the device's, else
/// the PTX of the highest virtual architecture not above it (JIT-compiled: this needs a
/// driver at least as new as the toolkit that wrote the PTX). `None`: no image runs there.
pub fn select<'a, 'b>(entries: &'b [Entry<'a>], sm: u32) -> Option<&'b Entry<'a>> {
    let cubin = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Cubin && e.arch / 10 == sm / 10 && e.arch <= sm)
        .max_by_key(|e| e.arch);
    cubin.or_else(|| {
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Ptx && e.arch <= sm)
            .max_by_key(|e| e.arch)
    })
}

/// Names of the kernels (`__global__` entry points) an uncompressed cubin or PTX defines.
pub fn kernel_names(entry: &Entry<'_>) -> Result<Vec<String>, FatbinError> {
    if entry.compressed {
        return err(format!(
            "the {:?} entry for arch {} is compressed",
            entry.kind, entry.arch
        ));
    }
    match entry.kind {
        EntryKind::Cubin => elf_kernel_names(entry.payload),
        EntryKind::Ptx => Ok(ptx_kernel_names(entry.payload)),
        EntryKind::Other(k) => err(format!("entry kind {k} is neither PTX nor a cubin")),
    }
}

/// `.entry` directives of PTX text.
pub fn ptx_kernel_names(ptx: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(ptx);
    let mut names = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == ".entry" {
                if let Some(name) = words.next() {
                    let name: String = name
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
                        .collect();
                    if !name.is_empty() {
                        names.push(name);
                    }
                }
                break;
            }
        }
    }
    names
}

/// Kernel symbols of a 64-bit little-endian ELF cubin: functions marked as CUDA entry points
/// (`STO_CUDA_ENTRY`, 0x10 in `st_other`).
pub fn elf_kernel_names(elf: &[u8]) -> Result<Vec<String>, FatbinError> {
    const SHT_SYMTAB: u32 = 2;
    const STT_FUNC: u8 = 2;
    const STO_CUDA_ENTRY: u8 = 0x10;
    if elf.get(0..4) != Some(&ELF_MAGIC[..]) {
        return err("cubin does not start with the ELF magic");
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return err("cubin is not a 64-bit little-endian ELF");
    }
    let bad = || FatbinError("truncated ELF header".to_string());
    let shoff = u64_at(elf, 0x28).ok_or_else(bad)? as usize;
    let shentsize = u16_at(elf, 0x3A).ok_or_else(bad)? as usize;
    let shnum = u16_at(elf, 0x3C).ok_or_else(bad)? as usize;
    if shentsize < 64 {
        return err(format!("section header entries of {shentsize} bytes"));
    }
    // (type, offset, size, link) of section i.
    let section = |i: usize| -> Result<(u32, usize, usize, usize), FatbinError> {
        let h = shoff + i * shentsize;
        let f = |o| u64_at(elf, h + o).map(|v| v as usize);
        match (u32_at(elf, h + 4), f(0x18), f(0x20), u32_at(elf, h + 0x28)) {
            (Some(t), Some(off), Some(size), Some(link)) => Ok((t, off, size, link as usize)),
            _ => err(format!("section header {i} is out of bounds")),
        }
    };
    let mut names = Vec::new();
    for i in 0..shnum {
        let (kind, off, size, link) = section(i)?;
        if kind != SHT_SYMTAB {
            continue;
        }
        let (_, str_off, str_size, _) = section(link)?;
        let strtab = elf
            .get(str_off..str_off + str_size)
            .ok_or_else(|| FatbinError("string table out of bounds".to_string()))?;
        let syms = elf
            .get(off..off + size)
            .ok_or_else(|| FatbinError("symbol table out of bounds".to_string()))?;
        for sym in syms.chunks_exact(24) {
            let (info, other) = (sym[4], sym[5]);
            if info & 0xf != STT_FUNC || other & STO_CUDA_ENTRY == 0 {
                continue;
            }
            let name_off = u32_at(sym, 0).unwrap_or(0) as usize;
            let name = strtab
                .get(name_off..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .ok_or_else(|| FatbinError("symbol name out of bounds".to_string()))?;
            names.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fatbin entry header of 64 bytes followed by `payload`, padded to 8 bytes.
    fn entry(kind: u16, arch: u32, flags: u64, payload: &[u8]) -> Vec<u8> {
        let padded = payload.len().div_ceil(8) * 8;
        let mut h = vec![0u8; 64];
        h[0..2].copy_from_slice(&kind.to_le_bytes());
        h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
        h[4..8].copy_from_slice(&64u32.to_le_bytes());
        h[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
        h[28..32].copy_from_slice(&arch.to_le_bytes());
        h[40..48].copy_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(payload);
        h.resize(64 + padded, 0);
        h
    }

    fn container(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut c = Vec::new();
        c.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&16u16.to_le_bytes());
        c.extend_from_slice(&(body.len() as u64).to_le_bytes());
        c.extend_from_slice(&body);
        c
    }

    /// A minimal ELF64 with a symbol table holding `funcs` (name, st_other).
    fn elf(funcs: &[(&str, u8)]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24]; // the null symbol
        for (name, other) in funcs {
            let off = strtab.len() as u32;
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
            let mut s = vec![0u8; 24];
            s[0..4].copy_from_slice(&off.to_le_bytes());
            s[4] = 0x12; // GLOBAL FUNC
            s[5] = *other;
            symtab.extend_from_slice(&s);
        }
        let mut e = vec![0u8; 64];
        e[0..4].copy_from_slice(&ELF_MAGIC);
        e[4] = 2;
        e[5] = 1;
        let str_off = e.len();
        e.extend_from_slice(&strtab);
        let sym_off = e.len();
        e.extend_from_slice(&symtab);
        let shoff = e.len();
        let sh = |t: u32, off: usize, size: usize, link: u32| {
            let mut h = vec![0u8; 64];
            h[4..8].copy_from_slice(&t.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h[0x28..0x2C].copy_from_slice(&link.to_le_bytes());
            h
        };
        e.extend(sh(0, 0, 0, 0));
        e.extend(sh(3, str_off, strtab.len(), 0));
        e.extend(sh(2, sym_off, symtab.len(), 1));
        e[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        e[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        e[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        e
    }

    #[test]
    fn parses_entries_and_names() {
        let cubin = elf(&[
            ("relu_fwd_f32", 0x10),
            ("helper", 0),
            ("gelu_fwd_f32", 0x10),
        ]);
        let ptx = b"\n.version 9.0\n.visible .entry relu_fwd_f32(\n.param .u64 a\n)\n.visible .entry gelu_fwd_f32(\n";
        let blob = container(&[
            entry(2, 80, 0x11, &cubin),
            entry(2, 90, 0x11, &cubin),
            entry(1, 90, 0x11, ptx),
        ]);
        let es = entries(&blob).unwrap();
        assert_eq!(es.len(), 3);
        assert_eq!(
            (es[0].kind, es[0].arch, es[0].compressed),
            (EntryKind::Cubin, 80, false)
        );
        assert_eq!((es[2].kind, es[2].arch), (EntryKind::Ptx, 90));
        let want = vec!["relu_fwd_f32".to_string(), "gelu_fwd_f32".to_string()];
        assert_eq!(kernel_names(&es[0]).unwrap(), want);
        assert_eq!(kernel_names(&es[2]).unwrap(), want);
    }

    #[test]
    fn selects_what_the_driver_would_run() {
        let blob = container(&[
            entry(2, 80, 0, b"a"),
            entry(2, 86, 0, b"b"),
            entry(2, 89, 0, b"c"),
            entry(2, 90, 0, b"d"),
            entry(1, 90, 0, b"p"),
        ]);
        let es = entries(&blob).unwrap();
        let pick = |sm| select(&es, sm).map(|e| (e.kind, e.arch));
        assert_eq!(pick(80), Some((EntryKind::Cubin, 80)));
        assert_eq!(pick(87), Some((EntryKind::Cubin, 86))); // Jetson Orin runs the sm_86 cubin
        assert_eq!(pick(89), Some((EntryKind::Cubin, 89)));
        assert_eq!(pick(90), Some((EntryKind::Cubin, 90)));
        assert_eq!(pick(100), Some((EntryKind::Ptx, 90))); // Blackwell: JIT from PTX
        assert_eq!(pick(75), None); // Turing: nothing
    }

    #[test]
    fn compressed_and_malformed_input() {
        let blob = container(&[entry(1, 90, 0x8011, b"(\xb5/\xfd")]);
        let es = entries(&blob).unwrap();
        assert!(es[0].compressed);
        assert!(kernel_names(&es[0]).is_err());

        assert!(entries(b"\x7fELF....").is_err());
        let mut truncated = container(&[entry(2, 90, 0, b"abcdefgh")]);
        truncated.truncate(truncated.len() - 4);
        let e = entries(&truncated).unwrap_err();
        assert!(e.to_string().contains("claims"), "{e}");
        assert!(elf_kernel_names(b"\x7fELF\x01\x01").is_err());
    }
}
