//! The settings API: HTTP/1.1 on a Unix socket.

pub mod http;
