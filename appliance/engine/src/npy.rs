//! Reading and writing `.npy` files (NumPy's format, version 1.0) of f32 and i64 arrays: the
//! exchange format of the diffusers reference fixtures and of `generate --init-noise`.

use std::path::Path;

use crate::error::EngineError;

/// An array read from a `.npy` file: its shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray<T> {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in C order.
    pub data: Vec<T>,
}

/// Element types this module reads and writes.
pub trait NpyElement: Sized + Copy {
    /// NumPy's dtype descriptor, little-endian.
    const DESCR: &'static str;
    /// Decodes one little-endian element.
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends one little-endian element.
    fn put_le(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u8 {
    const DESCR: &'static str = "|u1";
    fn from_le(b: &[u8]) -> Self {
        b[0]
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}

impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    fn from_le(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        i64::from_le_bytes(a)
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// Reads a C-order little-endian `.npy` of element type `T`.
pub fn read<T: NpyElement>(path: &Path) -> Result<NpyArray<T>, EngineError> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    parse(&bytes).map_err(|reason| EngineError::Npy {
        path: path.to_path_buf(),
        reason,
    })
}

fn parse<T: NpyElement>(bytes: &[u8]) -> Result<NpyArray<T>, String> {
    if bytes.len() < 12 || !bytes.starts_with(b"\x93NUMPY") {
        return Err("no NUMPY magic".into());
    }
    let (header_len, start) = match bytes.get(6) {
        Some(1) => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        Some(2 | 3) => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err("unknown version".into()),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated header")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(key).ok_or(format!("header has no {key}"))? + key.len();
        Ok(header[at..].trim_start_matches([' ', ':']))
    };
    let descr = field("'descr'")?;
    if !descr.starts_with(&format!("'{}'", T::DESCR)) {
        return Err(format!("dtype is {descr:.6}, expected {}", T::DESCR));
    }
    if field("'fortran_order'")?.starts_with("True") {
        return Err("Fortran order is not supported".into());
    }
    let shape_text = field("'shape'")?
        .strip_prefix('(')
        .ok_or("shape is not a tuple")?;
    let shape_text = &shape_text[..shape_text.find(')').ok_or("bad shape")?];
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad dimension {s:?}")))
        .collect::<Result<_, _>>()?;
    let size = std::mem::size_of::<T>();
    // A header may claim any shape: the byte count is computed without overflow and checked
    // against the file before anything is allocated.
    let needed = shape
        .iter()
        .try_fold(size, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let body = &bytes[start + header_len..];
    if body.len() != needed {
        return Err(format!(
            "{} data bytes, shape {shape:?} needs {needed}",
            body.len()
        ));
    }
    Ok(NpyArray {
        shape,
        data: body.chunks_exact(size).map(T::from_le).collect(),
    })
}

/// Writes a C-order little-endian `.npy` (version 1.0).
pub fn write<T: NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> Result<(), EngineError> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        T::DESCR
    );
    // Pad so the data starts on a 64-byte boundary, ending the header with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + std::mem::size_of_val(data));
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    let len = u16::try_from(header.len()).map_err(|_| EngineError::Npy {
        path: path.to_path_buf(),
        reason: "header too long".into(),
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    data.iter().for_each(|v| v.put_le(&mut out));
    std::fs::write(path, out).map_err(|e| EngineError::io(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

    use super::*;

    /// A version 1.0 file with `header` and `body`.
    fn file(header: &str, body: &[u8]) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&u16::try_from(header.len()).unwrap().to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body);
        out
    }

    fn header(shape: &str) -> String {
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}")
    }

    #[test]
    fn a_written_array_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        write(&path, &[1, 2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let array = read::<f32>(&path).unwrap();
        assert_eq!(array.shape, [1, 2, 3]);
        assert_eq!(array.data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn a_malformed_shape_is_an_error_not_a_panic() {
        for (shape, reason) in [
            (")", "shape is not a tuple"),
            ("é)", "shape is not a tuple"),
            ("[2, 2]", "shape is not a tuple"),
            ("(2, 2", "bad shape"),
        ] {
            let got = parse::<f32>(&file(&header(shape), &[0; 16]));
            assert_eq!(got, Err(reason.to_string()), "shape {shape:?}");
        }
    }

    #[test]
    fn a_shape_whose_size_overflows_is_an_error_not_a_panic() {
        let huge = format!("({}, {})", usize::MAX / 2, 4);
        let got = parse::<f32>(&file(&header(&huge), &[]));
        assert_eq!(
            got,
            Err(format!("shape [{}, 4] is too large", usize::MAX / 2))
        );
    }

    #[test]
    fn a_body_of_the_wrong_length_is_refused() {
        let got = parse::<f32>(&file(&header("(3,)"), &[0; 8]));
        assert_eq!(got, Err("8 data bytes, shape [3] needs 12".to_string()));
    }
}
