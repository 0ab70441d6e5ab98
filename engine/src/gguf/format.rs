//! The GGUF container (version 3), read and written by our own code.
//!
//! Layout (little endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/values, the tensor infos (name, `u32` n_dims, `u64` dims innermost first, `u32`
//! ggml type, `u64` offset relative to the data section), padding to the alignment
//! (`general.alignment`, default 32), then the tensor data, each tensor starting at an aligned offset.
//!
//! [`GgufFile`] memory-maps a file and parses its header; tensor bytes are borrowed from the map.
//! [`GgufWriter`] writes a header for tensors whose sizes are known up front, then streams the
//! tensor data in order, chunk by chunk, so a converter never holds more than one tensor.
//!
//! Submodules: `types` (ggml tensor types, metadata values), `read` ([`GgufFile`]), `write`
//! ([`GgufWriter`]); their items are re-exported here.

mod read;
mod types;
mod write;

pub use read::{GgufFile, TensorInfo};
pub use types::{file_type_code, ArrayType, GgmlType, Value};
pub use write::{GgufWriter, TensorSpec};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let dir = std::env::temp_dir().join(format!("omni-gguf-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("test".into()),
            ),
            ("a.list".to_string(), Value::i32s(&[1, -2, 3])),
            ("a.strings".to_string(), Value::strings(&["x", "yz"])),
            ("a.f".to_string(), Value::F32(0.5)),
        ];
        let specs = vec![
            TensorSpec {
                name: "w".into(),
                dims: vec![32, 2],
                dtype: GgmlType::Q8_0,
            },
            TensorSpec {
                name: "b".into(),
                dims: vec![3],
                dtype: GgmlType::F32,
            },
        ];
        let mut w = GgufWriter::create(&path, &meta, specs).unwrap();
        w.write(&[1u8; 34]).unwrap();
        w.write(&[2u8; 34]).unwrap();
        w.write(&[0u8; 12]).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture"), Some("test"));
        assert_eq!(f.get("a.list"), Some(&Value::i32s(&[1, -2, 3])));
        assert_eq!(f.get("a.strings"), Some(&Value::strings(&["x", "yz"])));
        let t = f.tensor("w").unwrap();
        assert_eq!(t.offset % 32, 0);
        assert_eq!(&f.bytes(t)[..34], &[1u8; 34]);
        assert_eq!(&f.bytes(t)[34..], &[2u8; 34]);
        let b = f.tensor("b").unwrap();
        assert_eq!(b.offset % 32, 0);
        assert_eq!(f.bytes(b), &[0u8; 12]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
