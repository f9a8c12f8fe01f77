//! Series tracker (placeholder until the tracker branch lands).
