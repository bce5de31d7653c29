//! The crate's one way to lock a `std::sync::Mutex`.
//!
//! Owns: [`lock`]. Every mutex it is used on guards plain values that a panicking holder cannot
//! leave half-written, so a poisoned lock is taken as is instead of spreading the panic.

/// Locks `mutex`, ignoring poisoning (plain values only).
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
