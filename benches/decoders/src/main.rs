//! Decodes every JPEG under DIR (recursively) to 8-bit RGB with each decoder on one thread and
//! prints images per second. The files are read into memory first, so only decoding is timed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

fn jpegs(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            jpegs(&p, out)?;
        } else if p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| ["jpg", "jpeg"].contains(&x.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

fn zune(bytes: &[u8]) -> usize {
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(bytes, options);
    d.decode().expect("zune-jpeg decodes").len()
}

fn image_crate(bytes: &[u8]) -> usize {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
        .expect("image decodes")
        .into_rgb8()
        .len()
}

fn jpeg_decoder(bytes: &[u8]) -> usize {
    let mut d = jpeg_decoder::Decoder::new(bytes);
    let pixels = d.decode().expect("jpeg-decoder decodes");
    let info = d.info().expect("jpeg-decoder has the header");
    // Greyscale expanded to RGB, as the others do.
    match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => pixels.len() * 3,
        _ => pixels.len(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().expect("usage: recycle-decoder-bench DIR [PASSES]"));
    let passes: usize = args.get(1).map_or(3, |s| s.parse().expect("PASSES"));
    let mut paths = Vec::new();
    jpegs(&dir, &mut paths).expect("DIR lists");
    let files: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).expect("read")).collect();
    let mb: f64 = files.iter().map(|f| f.len()).sum::<usize>() as f64 / 1e6;
    println!("{} JPEGs, {mb:.1} MB, {passes} passes each, 1 thread", files.len());
    let decoders: [(&str, fn(&[u8]) -> usize); 3] = [
        ("zune-jpeg 0.4", zune),
        ("image 0.25.6 (zune-jpeg inside)", image_crate),
        ("jpeg-decoder 0.3", jpeg_decoder),
    ];
    for (name, decode) in decoders {
        let warm: usize = files.iter().map(|f| decode(f)).sum();
        let t0 = Instant::now();
        for _ in 0..passes {
            for f in &files {
                std::hint::black_box(decode(f));
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "{name}: {:.1} images/s ({:.0} Mpixel/s)",
            (passes * files.len()) as f64 / dt,
            (passes * warm) as f64 / 3.0 / dt / 1e6
        );
    }
}
