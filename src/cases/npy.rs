//! A minimal `.npy` writer (format version 1.0) for `vkdecode replay --dump`: enough for NumPy
//! (`np.load`) to read the inputs and outputs of a case, with no dependency.
//!
//! Format (numpy.lib.format): the magic `\x93NUMPY`, version bytes `1 0`, a little-endian u16
//! header length, then an ASCII Python dict literal
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded with spaces and ended by
//! `\n` so that the data starts at a multiple of 64 bytes; then the elements in C order, little
//! endian. Only the element types the dumps need exist: `<f4`, `<f8`, `<u4`, `<u2`.
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
}

impl NpyData<'_> {
    /// The NumPy type string.
    pub fn descr(&self) -> &'static str {
        match self {
            NpyData::F32(_) => "<f4",
            NpyData::F64(_) => "<f8",
            NpyData::U32(_) => "<u4",
            NpyData::U16(_) => "<u2",
        }
    }

    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        match self {
            NpyData::F32(_) | NpyData::U32(_) => 4,
            NpyData::F64(_) => 8,
            NpyData::U16(_) => 2,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            NpyData::F32(d) => d.len(),
            NpyData::F64(d) => d.len(),
            NpyData::U32(d) => d.len(),
            NpyData::U16(d) => d.len(),
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
            NpyData::U16(d) => d.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
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
