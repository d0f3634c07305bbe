//! Our broker and pipeliner against the original's router (a Python stand-in that knows only
//! the legacy commands): they fall back to those commands and pipelines finish
//! (tests/python/test_original_router.py).

use crate::support::bin;

#[test]
fn our_broker_and_pipeliner_fall_back_to_the_original_routers_commands() {
    let broker = bin("my_broker");
    let pipeliner = bin("my_pipeliner");
    pypelinin_common::testing::pytest(
        "test_original_router.py",
        &[
            ("PYPELININ_BROKER", broker.to_str().unwrap()),
            ("PYPELININ_PIPELINER", pipeliner.to_str().unwrap()),
        ],
    );
}
