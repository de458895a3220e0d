//! One publisher cannot starve the others (issue 10, defect 6): the broker reads each peer for
//! a bounded budget per loop turn and comes back to it later, so while a raw peer floods
//! publishes as fast as it can write, a worker's messages still cross the broker.

mod channel_peer;
mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_peer::*;
use common::*;
use serde_json::json;

#[test]
fn a_flooding_publisher_does_not_starve_the_others() {
    let broker = Broker::start("fairness");
    let fast = "[limits]\ncommands_per_second = 100000\ncommands_burst = 100000\n";
    let (_server, mut sender, mut receiver) = broker.sender_and_receiver(fast, "g");

    // The flooder: small MESSAGE frames to a group nobody reads, written without pause.
    let flooder = RawPeer::tcp(broker.port()).join(Some(BROKER_SECRET), 0xf100d, "flooder");
    let mut batch = Vec::new();
    for seq in 1..=100_000u64 {
        batch.extend(message(0xf100d, seq, "f", b""));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let thread = {
        let (stop, written) = (stop.clone(), written.clone());
        let mut link = flooder.link;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if link.write_all(&batch).is_err() {
                    return;
                }
                written.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        })
    };
    wait_for("the flood to run", Duration::from_secs(30), || {
        (written.load(Ordering::Relaxed) >= 64 << 20).then_some(())
    });

    // While it runs, the worker's messages get through, each within a generous deadline.
    for i in 0..10 {
        sender.send_to_group(&json!("g"), &format!("m{i}"));
        let got = receiver.next_message(Duration::from_secs(10));
        let text = got.map(|m| m.into_text().unwrap().as_str().to_owned());
        assert_eq!(text.as_deref(), Some(format!("m{i}").as_str()), "starved behind the flood");
    }
    assert!(!thread.is_finished(), "the flood was still running");
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
}
