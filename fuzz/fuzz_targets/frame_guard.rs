//! Fuzzes the guard's reading of ZMTP framing: any bytes, cut anywhere, must give the same
//! verdict and message count as the whole, without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pypelinin_common::transport::guard::Scanner;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let max = 1 << 20;
    let mut whole = Scanner::new(max);
    let whole_verdict = whole.scan(bytes);
    let mut pieces = Scanner::new(max);
    let step = usize::from(cut).max(1);
    let mut piece_verdict = Ok(());
    for piece in bytes.chunks(step) {
        piece_verdict = pieces.scan(piece);
        if piece_verdict.is_err() {
            break;
        }
    }
    assert_eq!(whole_verdict, piece_verdict, "the verdict depends on how the bytes were cut");
    if whole_verdict.is_ok() {
        assert_eq!(whole.messages(), pieces.messages());
        assert_eq!(whole.greeted(), pieces.greeted());
    }
});
