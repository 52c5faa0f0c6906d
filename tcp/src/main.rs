//! nvmed-tcp: serve nvmed namespaces over NVMe/TCP.
fn main() {}
