//! Decoding one image file of an image folder into 8-bit RGB.
//!
//! The format is told by the file's first bytes, not its name (ImageNet's training set holds a
//! PNG named `.JPEG` and CMYK JPEGs). JPEG goes through zune-jpeg, which converts greyscale,
//! CMYK and YCCK to RGB itself; PNG through the `png` crate, expanded to 8 bits, alpha dropped
//! (as PIL's `convert("RGB")`). Both decoders are given size limits, so a hostile header cannot
//! make them allocate without bound, and a decoder that panics on a hostile file is turned into
//! an error like any other damage.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Largest width or height accepted (larger than any photograph of a classification data set).
pub const MAX_SIDE: usize = 16_384;
/// Largest image in pixels: Pillow's limit for a decompression bomb (2 x 89,478,485).
pub const MAX_PIXELS: usize = 178_956_970;
/// Largest buffer the PNG decoder may allocate.
const MAX_BYTES: usize = 4 * MAX_PIXELS;

fn check_size(width: usize, height: usize) -> Result<(), String> {
    if width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS {
        return Err(format!(
            "{width}x{height} is larger than allowed ({MAX_SIDE} on a side, {MAX_PIXELS} pixels)"
        ));
    }
    Ok(())
}

/// A decoded image: `height * width * 3` bytes, row-major, RGB interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decodes a JPEG or PNG file's bytes into RGB. The error says what is wrong with the bytes
/// (the caller names the file).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            decode_jpeg(bytes)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes)
        } else {
            Err(format!(
                "neither a JPEG nor a PNG (first bytes {:02x?})",
                &bytes[..bytes.len().min(8)]
            ))
        }
    }));
    let image = decoded.unwrap_or_else(|_| Err("the decoder failed on this file".to_string()))?;
    if image.width == 0 || image.height == 0 {
        return Err(format!("empty image ({}x{})", image.width, image.height));
    }
    if image.pixels.len() != image.width * image.height * 3 {
        return Err(format!(
            "decoded {} bytes for a {}x{} RGB image",
            image.pixels.len(),
            image.width,
            image.height
        ));
    }
    Ok(image)
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
        .set_strict_mode(false);
    let mut d = JpegDecoder::new_with_options(bytes, options);
    d.decode_headers()
        .map_err(|e| format!("JPEG header: {e:?}"))?;
    let (width, height) = d
        .dimensions()
        .ok_or_else(|| "JPEG without dimensions".to_string())?;
    check_size(width, height)?;
    let pixels = d.decode().map_err(|e| format!("JPEG data: {e:?}"))?;
    // Greyscale files come out as one channel: copied to the three.
    let pixels = match d.get_output_colorspace() {
        Some(ColorSpace::RGB) => pixels,
        Some(ColorSpace::Luma) => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        other => return Err(format!("JPEG decoded to {other:?}, not RGB or grey")),
    };
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

fn decode_png(bytes: &[u8]) -> Result<RgbImage, String> {
    use png::{BitDepth, ColorType, Transformations};
    let mut d = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: MAX_BYTES });
    // Palette and low bit depths expanded, 16 bits stripped to 8: every output is 8-bit grey,
    // grey+alpha, RGB or RGBA.
    d.set_transformations(Transformations::normalize_to_color8());
    let mut reader = d.read_info().map_err(|e| format!("PNG header: {e}"))?;
    let (w, h) = reader.info().size();
    let (width, height) = (w as usize, h as usize);
    check_size(width, height)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| "PNG too large for memory".to_string())?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("PNG data: {e}"))?;
    let (color, depth) = (frame.color_type, frame.bit_depth);
    if depth != BitDepth::Eight {
        return Err(format!("PNG decoded to {depth:?} bits, not 8"));
    }
    let channels = match color {
        ColorType::Grayscale => 1,
        ColorType::GrayscaleAlpha => 2,
        ColorType::Rgb => 3,
        ColorType::Rgba => 4,
        ColorType::Indexed => return Err("PNG palette was not expanded".to_string()),
    };
    let stride = frame.line_size;
    if stride < width * channels || buf.len() < stride * height {
        return Err(format!(
            "PNG rows of {stride} bytes do not hold {width} pixels"
        ));
    }
    let mut pixels = Vec::with_capacity(width * height * 3);
    for row in buf.chunks_exact(stride).take(height) {
        for px in row[..width * channels].chunks_exact(channels) {
            match channels {
                1 | 2 => pixels.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => pixels.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_truncated_bytes_are_errors() {
        let err = decode_rgb(b"GIF89a....").unwrap_err();
        assert!(err.contains("neither a JPEG nor a PNG"), "{err}");
        assert!(decode_rgb(&[]).is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]).is_err());
        assert!(decode_rgb(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR").is_err());
    }
}
