//! Placeholder: a helper is writing the user-data providers here.
