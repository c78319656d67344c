//! Placeholder: a helper is writing the HTTP/1.1 server here.
