//! WebSocket pieces the worker needs, without tungstenite's per-connection `WebSocket` object
//! (whose eager 128 KiB read buffer would cost more than a whole idle connection is allowed):
//! the HTTP upgrade (`handshake`) and frame parse/encode (`frame`), built on tungstenite's
//! accept-key derivation and `FrameHeader`.

pub mod frame;
pub mod handshake;

/// Close codes groupcast sends (RFC 6455 section 7.4.1); documented in docs/protocol.md.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    /// Application range: the connection token's `exp` passed without a `refresh`.
    pub const TOKEN_EXPIRED: u16 = 4001;

    /// Whether a peer may send `code` in a close frame (RFC 6455 section 7.4 and the IANA
    /// registry): 1000-1003, 1007-1014 and the application ranges 3000-4999. 1005, 1006 and
    /// 1015 are reserved for reports that never go on the wire; the rest are unassigned.
    pub fn valid_from_peer(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}
