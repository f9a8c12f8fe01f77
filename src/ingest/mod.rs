//! Storage SCP (in progress).
