//! TEMPORARY stub of the old worker's side of a live hand-off (the lead replaces this file):
//! it answers every `Request::HandOff` with `fell_back`. The master answers a `fell_back` (or
//! `moved`) report with `Request::Shutdown { 1012, drain of this reload }`, which closes the
//! clients as a close-mode reload does, draining them on `reload -g`.

use std::os::fd::OwnedFd;
use std::time::Duration;

use log::warn;

use super::Worker;
use crate::control::report::{HandOffOutcome, HandOffReport};
use crate::control::Reply;
use crate::ws::close_code;

impl Worker {
    pub(super) fn begin_hand_off(&mut self, fd: Option<OwnedFd>, generation: u64, _timeout: Duration) {
        drop(fd);
        let report = HandOffReport {
            generation,
            index: self.index,
            outcome: HandOffOutcome::FellBack,
            closed: self.clients.len() as u64,
            reason: "not implemented".into(),
            ..Default::default()
        };
        if let Err(e) = self.control.send_json(Reply::HandOff(report)) {
            warn!("cannot report the hand-off to the master: {e}");
            // No master to send the Shutdown: close as a close-mode reload would.
            self.shut_down(close_code::SERVICE_RESTART, Duration::ZERO);
        }
    }
}
