//! An interrupted `omni quantize` leaves no output file behind (its own test binary: the interrupt
//! flag is process-wide).

mod common;

use std::sync::atomic::Ordering;

use omni_engine::gguf::quantize::{quantize, NoQuantizeProgress, QuantizeOptions, INTERRUPTED};
use omni_engine::gguf::GgmlType;

#[test]
fn an_interrupt_leaves_no_files() {
    let out = tempfile::tempdir().unwrap();
    INTERRUPTED.store(true, Ordering::SeqCst);
    let err = quantize(
        &QuantizeOptions::new(&common::fixture("tiny-a"), out.path(), GgmlType::Q8_0),
        &mut NoQuantizeProgress,
    )
    .unwrap_err();
    INTERRUPTED.store(false, Ordering::SeqCst);
    assert!(format!("{err:#}").contains("interrupted"), "{err:#}");
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    // And without the interrupt, all three files appear under their final names only.
    quantize(
        &QuantizeOptions::new(&common::fixture("tiny-a"), out.path(), GgmlType::Q8_0),
        &mut NoQuantizeProgress,
    )
    .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["mmproj-q8_0.gguf", "talker-q8_0.gguf", "thinker-q8_0.gguf"]
    );
}
