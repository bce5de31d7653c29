//! The process's memory allocator, tuned before any thread starts (glibc only).
//!
//! glibc's malloc gives each thread that allocates an arena of its own and raises its mmap
//! threshold each time a large block is freed, so a page of records freed on one Tokio worker
//! thread and the next page allocated on another leave two heaps' worth of high-water marks.
//! Measured on the 10,000-message backlog drain, one arena and a fixed 128 KiB mmap and trim
//! threshold took peak RSS from 35–37 MB to 33 MB at the same CPU (bench/ANALYSIS.md).
//!
//! Invariant: a parameter the operator set (its `MALLOC_*` variable or `GLIBC_TUNABLES`) is never
//! overridden. Must be called before the runtime's threads start; does nothing off glibc.

/// One malloc parameter this process sets: its `mallopt` number, the variable and the tunable
/// that set it from outside, and the value.
struct Tuning {
    #[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
    param: i32,
    variable: &'static str,
    tunable: &'static str,
    value: i32,
}

const TUNINGS: [Tuning; 3] = [
    // M_ARENA_MAX
    Tuning {
        param: -8,
        variable: "MALLOC_ARENA_MAX",
        tunable: "glibc.malloc.arena_max",
        value: 1,
    },
    // M_MMAP_THRESHOLD: glibc's initial value, kept fixed (setting it stops the raising).
    Tuning {
        param: -3,
        variable: "MALLOC_MMAP_THRESHOLD_",
        tunable: "glibc.malloc.mmap_threshold",
        value: 128 << 10,
    },
    // M_TRIM_THRESHOLD
    Tuning {
        param: -1,
        variable: "MALLOC_TRIM_THRESHOLD_",
        tunable: "glibc.malloc.trim_threshold",
        value: 128 << 10,
    },
];

/// The tunings the environment leaves to this process.
fn wanted(env: impl Fn(&str) -> Option<String>) -> impl Iterator<Item = &'static Tuning> {
    let tunables = env("GLIBC_TUNABLES").unwrap_or_default();
    TUNINGS
        .iter()
        .filter(move |tuning| env(tuning.variable).is_none() && !tunables.contains(tuning.tunable))
}

/// Applies the tunings the environment leaves to this process.
pub fn tune() {
    for tuning in wanted(|name| std::env::var(name).ok()) {
        apply(tuning);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply(tuning: &Tuning) {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    // It returns 0 on an invalid value, which leaves glibc's default: nothing to handle.
    unsafe {
        libc::mallopt(tuning.param, tuning.value);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply(_tuning: &Tuning) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(env: &[(&str, &str)]) -> Vec<&'static str> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        wanted(|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .map(|tuning| tuning.variable)
            .collect()
    }

    #[test]
    fn every_tuning_applies_when_the_environment_sets_none() {
        assert_eq!(
            names(&[]),
            ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_parameters_are_glibcs() {
        let params: Vec<i32> = TUNINGS.iter().map(|tuning| tuning.param).collect();
        assert_eq!(
            params,
            [libc::M_ARENA_MAX, libc::M_MMAP_THRESHOLD, libc::M_TRIM_THRESHOLD]
        );
    }

    #[test]
    fn a_parameter_the_operator_set_is_left_alone() {
        assert_eq!(
            names(&[("MALLOC_ARENA_MAX", "4")]),
            ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        );
        assert_eq!(
            names(&[(
                "GLIBC_TUNABLES",
                "glibc.malloc.trim_threshold=0:glibc.malloc.arena_max=2"
            )]),
            ["MALLOC_MMAP_THRESHOLD_"]
        );
    }
}
