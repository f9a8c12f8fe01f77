//! Durable spool (in progress).
