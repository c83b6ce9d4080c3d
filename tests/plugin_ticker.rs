//! The epoch ticker parks when no plugin has been called for a while and the next call
//! wakes it: a runaway plugin called after a quiet spell is still interrupted at its
//! deadline. Alone in its own test binary, so nothing else keeps the ticker awake.

use std::time::{Duration, Instant};

use keyway_proxy::plugin::{ClassifierPlugin, PluginError};
use keyway_tests::plugin;

#[test]
fn a_runaway_plugin_is_interrupted_after_the_ticker_went_idle() {
    let spin =
        ClassifierPlugin::load(&plugin("misbehave-classifier"), r#"{"mode": "spin"}"#).unwrap();
    let ok = ClassifierPlugin::load(&plugin("misbehave-classifier"), r#"{"mode": "ok"}"#).unwrap();
    for round in 0..2 {
        assert!(ok.classify("GET", "/", "h").is_ok());
        // Longer than the ticker's idle threshold (twice the 500 ms policy deadline).
        std::thread::sleep(Duration::from_millis(1500));
        let t = Instant::now();
        assert_eq!(
            spin.classify("GET", "/", "h"),
            Err(PluginError::Timeout),
            "round {round}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "round {round}: interrupted near its 20 ms deadline, not after {:?}",
            t.elapsed()
        );
    }
}
