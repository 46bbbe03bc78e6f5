//! `weftctl`: is my mesh healthy, and what config does each proxy hold?
fn main() {}
