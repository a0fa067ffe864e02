//! A minimal `.npy` writer (format version 1.0) and reader, for `vkdecode replay --dump` and the
//! export/judge exchange with runtimes in other languages (`crate::external`), with no dependency.
//!
//! Format (numpy.lib.format): the magic `\x93NUMPY`, version bytes `1 0`, a little-endian u16
//! header length, then an ASCII Python dict literal
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces and ended by
//! `\n` so that the data starts at a multiple of 64 bytes; then the elements in C order, little
//! endian. Only the element types the exchange needs exist: `<f4`, `<f8`, `<f2`, `<u4`, `<u2`,
//! `<i4` and `|b1`. The reader takes versions 1.0 to 3.0 of any of them, C order only.
//!
//! Writes are atomic (temporary file in the same directory + rename), so a reader never sees a
//! half-written array; every error names the file.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Data start alignment of the format.
const ALIGN: usize = 64;
/// `\x93NUMPY`, major 1, minor 0.
const MAGIC: &[u8; 8] = b"\x93NUMPY\x01\x00";

/// The elements of one array, in C (row-major) order.
#[derive(Clone, Copy, Debug)]
pub enum NpyData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    U32(&'a [u32]),
    U16(&'a [u16]),
    /// IEEE half-precision bit patterns (`<f2`).
    F16(&'a [u16]),
    I32(&'a [i32]),
    Bool(&'a [bool]),
}

impl NpyData<'_> {
    /// The NumPy type string.
    pub fn descr(&self) -> &'static str {
        match self {
            NpyData::F32(_) => "<f4",
            NpyData::F64(_) => "<f8",
            NpyData::U32(_) => "<u4",
            NpyData::U16(_) => "<u2",
            NpyData::F16(_) => "<f2",
            NpyData::I32(_) => "<i4",
            NpyData::Bool(_) => "|b1",
        }
    }

    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        match self {
            NpyData::F32(_) | NpyData::U32(_) | NpyData::I32(_) => 4,
            NpyData::F64(_) => 8,
            NpyData::U16(_) | NpyData::F16(_) => 2,
            NpyData::Bool(_) => 1,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            NpyData::F32(d) => d.len(),
            NpyData::F64(d) => d.len(),
            NpyData::U32(d) => d.len(),
            NpyData::U16(d) | NpyData::F16(d) => d.len(),
            NpyData::I32(d) => d.len(),
            NpyData::Bool(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append_le_bytes(&self, out: &mut Vec<u8>) {
        // Bit patterns are kept as they are (NaN payloads included).
        match self {
            NpyData::F32(d) => d.iter().for_each(|v| out.extend_from_slice(&v.to_bits().to_le_bytes())),
            NpyData::F64(d) => d.iter().for_each(|v| out.extend_from_slice(&v.to_bits().to_le_bytes())),
            NpyData::U32(d) => d.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            NpyData::U16(d) | NpyData::F16(d) => d.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            NpyData::I32(d) => d.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            NpyData::Bool(d) => out.extend(d.iter().map(|&b| u8::from(b))),
        }
    }
}

/// The Python tuple literal of a shape: `()`, `(n,)`, `(a, b)`.
fn shape_literal(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// Magic, version, header length and the padded header dict: everything before the data.
pub fn header(descr: &str, shape: &[usize]) -> io::Result<Vec<u8>> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}", shape_literal(shape));
    // magic + version (8) + u16 length (2) + dict + padding + '\n' ≡ 0 (mod 64)
    let unpadded = MAGIC.len() + 2 + dict.len() + 1;
    let total = unpadded.div_ceil(ALIGN) * ALIGN;
    let header_len = total - MAGIC.len() - 2;
    let header_len = u16::try_from(header_len).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("npy header of {header_len} bytes exceeds version 1.0"))
    })?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    Ok(out)
}

/// The whole file: header and data. Fails if `shape` does not hold exactly `data.len()` elements.
pub fn encode_npy(shape: &[usize], data: NpyData<'_>) -> io::Result<Vec<u8>> {
    let elements = shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
    if elements != Some(data.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("shape {} does not hold the {} elements given", shape_literal(shape), data.len()),
        ));
    }
    let mut out = header(data.descr(), shape)?;
    out.reserve(data.len() * data.element_size());
    data.append_le_bytes(&mut out);
    Ok(out)
}

/// Writes `data` with `shape` to `path` atomically (temporary file + rename; an existing file is
/// replaced). Every error message names `path`.
pub fn write_npy(path: &Path, shape: &[usize], data: NpyData<'_>) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let bytes = encode_npy(shape, data).map_err(named)?;
    write_atomic(path, &bytes).map_err(named)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// An array read from a `.npy` file: its type string, shape and raw little-endian elements.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub descr: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NpyArray {
    /// The elements as f64 (exact for `<f2`, `<f4`, `<f8`); other types are an error naming the
    /// type found.
    pub fn to_f64(&self) -> Result<Vec<f64>, String> {
        let d = &self.data;
        Ok(match self.descr.as_str() {
            "<f2" => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            "<f4" => d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            "<f8" => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect(),
            other => return Err(format!("dtype {other}, expected a float array (<f2, <f4 or <f8)")),
        })
    }
}

/// Bytes per element of a type string the reader knows.
fn descr_size(descr: &str) -> Option<usize> {
    Some(match descr {
        "|b1" | "|u1" | "|i1" => 1,
        "<f2" | "<u2" | "<i2" => 2,
        "<f4" | "<u4" | "<i4" => 4,
        "<f8" | "<u8" | "<i8" => 8,
        _ => return None,
    })
}

/// The value of `'key': ` in a header dict, up to the next top-level comma or brace.
fn dict_value<'a>(dict: &'a str, key: &str) -> Result<&'a str, String> {
    let start = [format!("'{key}':"), format!("\"{key}\":")]
        .iter()
        .find_map(|k| dict.find(k.as_str()).map(|i| i + k.len()))
        .ok_or_else(|| format!("header has no '{key}'"))?;
    let rest = dict[start..].trim_start();
    let end = if rest.starts_with('(') { rest.find(')').map(|i| i + 1) } else { rest.find([',', '}']) }
        .ok_or_else(|| format!("header's '{key}' is not terminated"))?;
    Ok(rest[..end].trim())
}

/// Parses a `.npy` file's bytes; `Err` says what is wrong.
pub fn decode_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let dict = bytes.get(start..start + len).ok_or("header runs past the end of the file")?;
    let dict = std::str::from_utf8(dict).map_err(|_| "header is not text")?;
    let descr = dict_value(dict, "descr")?.trim_matches(['\'', '"']).to_string();
    let size = descr_size(&descr).ok_or_else(|| format!("unsupported dtype {descr}"))?;
    if dict_value(dict, "fortran_order")? != "False" {
        return Err("Fortran-order arrays are not supported (write C order)".into());
    }
    let shape_text = dict_value(dict, "shape")?;
    let shape = shape_text
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| format!("bad shape {shape_text}")))
        .collect::<Result<Vec<_>, _>>()?;
    let data = &bytes[start + len..];
    let expected = shape.iter().try_fold(size, |acc, &n| acc.checked_mul(n)).ok_or("shape overflows")?;
    if data.len() != expected {
        return Err(format!("{} data bytes, shape {shape_text} of {descr} needs {expected}", data.len()));
    }
    Ok(NpyArray { descr, shape, data: data.to_vec() })
}

/// Reads a `.npy` file; every error names the file.
pub fn read_npy(path: &Path) -> Result<NpyArray, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_npy(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_text(bytes: &[u8]) -> &str {
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        std::str::from_utf8(&bytes[10..10 + len]).expect("ASCII header")
    }

    #[test]
    fn header_is_the_python_dict_padded_to_64_bytes() {
        let h = header("<f4", &[2, 3]).unwrap();
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(h.len() % 64, 0);
        assert_eq!(h.len(), 10 + u16::from_le_bytes([h[8], h[9]]) as usize);
        let text = header_text(&h);
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{text:?}");
        assert!(text.ends_with('\n'));
        assert!(text.trim_end_matches('\n').trim_start_matches(|c| c != '}').chars().skip(1).all(|c| c == ' '));
    }

    #[test]
    fn one_and_zero_dimensional_shapes_are_python_tuples() {
        assert!(header_text(&header("<u4", &[5]).unwrap()).contains("'shape': (5,), }"));
        assert!(header_text(&header("<f8", &[]).unwrap()).contains("'shape': (), }"));
        assert!(header_text(&header("<u2", &[1, 2, 3, 4]).unwrap()).contains("'shape': (1, 2, 3, 4), }"));
    }

    #[test]
    fn every_header_length_stays_aligned() {
        for n in [0usize, 1, 9, 10, 99, 12345, usize::MAX] {
            for descr in ["<f4", "<f8", "<u4", "<u2"] {
                let h = header(descr, &[n, 7]).unwrap();
                assert_eq!(h.len() % 64, 0, "{descr} {n}");
                assert_eq!(*h.last().unwrap(), b'\n');
            }
        }
    }

    #[test]
    fn data_is_little_endian_after_the_header_and_keeps_nan_bits() {
        let nan = f32::from_bits(0x7fc0_1234);
        let bytes = encode_npy(&[2], NpyData::F32(&[1.0, nan])).unwrap();
        let start = header("<f4", &[2]).unwrap().len();
        assert_eq!(start, 128, "the basic dict does not fit in 64 bytes; numpy writes 128 too");
        assert_eq!(bytes.len(), start + 8);
        assert_eq!(&bytes[start..start + 4], &1.0f32.to_le_bytes());
        assert_eq!(&bytes[start + 4..], &0x7fc0_1234u32.to_le_bytes());
        let bytes = encode_npy(&[3], NpyData::U16(&[1, 2, 0xabcd])).unwrap();
        assert_eq!(&bytes[start..], &[1, 0, 2, 0, 0xcd, 0xab]);
        let bytes = encode_npy(&[1, 1], NpyData::F64(&[0.5])).unwrap();
        assert_eq!(&bytes[start..], &0.5f64.to_le_bytes());
    }

    #[test]
    fn what_is_written_reads_back() {
        let cases: [(&[usize], NpyData<'_>); 4] = [
            (&[2, 2], NpyData::F32(&[1.0, -2.0, 3.5, f32::INFINITY])),
            (&[3], NpyData::F16(&[0x3c00, 0x7e00, 0x8001])),
            (&[1, 2], NpyData::I32(&[-1, 7])),
            (&[2, 1, 2], NpyData::Bool(&[true, false, false, true])),
        ];
        for (shape, data) in cases {
            let back = decode_npy(&encode_npy(shape, data).unwrap()).unwrap();
            assert_eq!((back.descr.as_str(), back.shape.as_slice()), (data.descr(), shape));
            let mut raw = Vec::new();
            data.append_le_bytes(&mut raw);
            assert_eq!(back.data, raw);
        }
        let f = decode_npy(&encode_npy(&[2], NpyData::F16(&[0x3c00, 0xc000])).unwrap()).unwrap();
        assert_eq!(f.to_f64().unwrap(), [1.0, -2.0]);
        assert!(decode_npy(&encode_npy(&[1], NpyData::I32(&[1])).unwrap()).unwrap().to_f64().is_err());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let good = encode_npy(&[2], NpyData::F32(&[1.0, 2.0])).unwrap();
        assert!(decode_npy(b"hello").unwrap_err().contains("magic"));
        assert!(decode_npy(&good[..good.len() - 1]).unwrap_err().contains("needs 8"));
        // The header is ASCII: edit it in place (the magic and the data are not UTF-8).
        let edit = |from: &[u8], to: &[u8]| {
            let mut bytes = good.clone();
            let at = bytes.windows(from.len()).position(|w| w == from).expect("in the header");
            bytes[at..at + to.len()].copy_from_slice(to);
            bytes
        };
        assert!(decode_npy(&edit(b"False", b"True ")).unwrap_err().contains("Fortran"));
        assert!(decode_npy(&edit(b"<f4", b"<c8")).unwrap_err().contains("unsupported dtype <c8"));
    }

    #[test]
    fn shape_must_match_the_data() {
        let err = encode_npy(&[2, 2], NpyData::U32(&[1, 2, 3])).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("(2, 2)"), "{err}");
    }

    #[test]
    fn write_is_atomic_and_names_the_file_on_error() {
        let dir = std::env::temp_dir().join(format!("vkdecode-npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        write_npy(&path, &[2], NpyData::U32(&[7, 8])).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), encode_npy(&[2], NpyData::U32(&[7, 8])).unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        let missing = dir.join("no-such-dir").join("b.npy");
        let err = write_npy(&missing, &[1], NpyData::U32(&[1])).unwrap_err();
        assert!(err.to_string().contains("b.npy"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
