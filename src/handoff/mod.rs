//! The hand-off socket protocol (issue 13): how an old worker (O) gives its open plain-TCP
//! connections, with their state, to its replacement (N) during a reload.
//!
//! The master makes an `AF_UNIX` `SOCK_SEQPACKET` pair and gives one end to each worker; this
//! module only speaks on it, it decides nothing: the worker drives the rounds (offer, batches,
//! prepared, commit, done). `record` is what is said (tag byte + postcard body, versioned,
//! validated against the receiver's limits); `socket` is how (one `sendmsg` per record with
//! the connections' descriptors attached, big batches split into `Part`s and put back
//! together by the `Assembler`). See docs/architecture.md, "Hand-off socket protocol".

pub mod record;
pub mod socket;

pub use record::{
    decode_handshake, decode_record, encode_record, readable, Accept, Batch, Bounds, Budget, Commit, ConnRecord,
    Counters, Cut, Done, HandOffError, IdentityRecord, MembershipRecord, Offer, Part, Prepared, RateRecord, Record,
    Refuse, FORMAT_CURRENT, FORMAT_PREVIOUS,
};
pub use socket::{
    split_record, Assembler, HandOffSocket, Incoming, Received, Sent, MAX_BATCH_BYTES, MAX_FDS_PER_RECORD,
    MAX_RECORD_BYTES,
};
