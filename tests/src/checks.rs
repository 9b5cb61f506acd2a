//! Assertions shared by the real-guest tests.

use std::sync::OnceLock;

use crate::{RunOutput, Runner, Scenario};

/// The runner of this test process, created once.
pub fn shared_runner() -> &'static Runner {
    static RUNNER: OnceLock<Runner> = OnceLock::new();
    RUNNER.get_or_init(crate::runner)
}

/// Runs a scenario and checks that no guest module failed to load, the
/// guest reached /init, ran the script to the end with status 0 and powered
/// off with VMM exit status 0.
pub fn boot(scenario: Scenario) -> RunOutput {
    let out = crate::run(shared_runner(), &scenario);
    let failed = out.markers(crate::scenario::KEY_MODULE_FAILED);
    assert!(
        failed.is_empty(),
        "guest modules failed to load: {failed:?}\n{}",
        out.summary()
    );
    assert!(
        out.reached_init(),
        "the guest never reached /init\n{}",
        out.summary()
    );
    assert_eq!(
        out.scenario_exit(),
        Some(0),
        "the scenario script did not finish with status 0\n{}",
        out.summary()
    );
    assert_eq!(
        out.vmm_exit,
        0,
        "the VMM did not exit with status 0 after the guest powered off\n{}",
        out.summary()
    );
    out
}

/// The value of the guest's `@@T:KEY=VALUE@@` marker; panics if absent.
pub fn marker(out: &RunOutput, key: &str) -> String {
    out.marker(&format!("T:{key}"))
        .unwrap_or_else(|| panic!("the guest printed no @@T:{key}=...@@\n{}", out.summary()))
}
