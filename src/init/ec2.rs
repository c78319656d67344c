//! Stage 2 on EC2 (DMI says so, see `userdata::is_ec2`): what changes in the boot.
//!
//! - **The network comes first.** User data and the instance's settings come from IMDS, which
//!   answers only once the interface has an address, so [`phases`] moves the `network` phase
//!   before `user-data`. The interface is configured from the settings as they are before user
//!   data: at the first boot that is DHCPv4 on the first Ethernet interface, which is what EC2
//!   offers. Network settings given in user data (`settings.network.interface`,
//!   `static-address`, ...) therefore take effect at the next boot, as every change of network
//!   settings does; the host name in user data takes effect at once.
//! - **Instance settings** (the `instance` phase, after `user-data`): the settings EC2 gives an
//!   instance, generated from IMDS when unset (`userdata::ec2`), committed as one transaction.
//!   What IMDS got wrong is a notice (console and `GET /boot`) and the boot goes on.

use log::info;

use super::{network, Ctx, Phase};
use crate::boot::{report, BootError};
use crate::userdata::{self, ec2, Imds};

/// The transaction the generated settings are committed in.
const TX: &str = "instance";

/// The phases in order for this machine: `PHASES` as they are, or with the network first and
/// the instance settings after user data on EC2.
pub fn phases(table: &[Phase], on_ec2: bool) -> Vec<Phase> {
    let mut phases: Vec<Phase> =
        table.iter().filter(|(name, _)| on_ec2 || *name != "instance").copied().collect();
    if on_ec2 {
        let at = |phases: &[Phase], want: &str| phases.iter().position(|(name, _)| *name == want);
        if let (Some(net), Some(_)) = (at(&phases, "network"), at(&phases, "user-data")) {
            let p = phases.remove(net);
            let ud = at(&phases, "user-data").expect("user-data is still there");
            phases.insert(ud, p);
        }
    }
    phases
}

/// The `instance` phase: generate the unset instance settings from IMDS (see the module docs).
pub fn instance_settings(ctx: &mut Ctx) -> Result<(), BootError> {
    let store = ctx.store.as_mut().ok_or(BootError::Order { needs: "the datastore" })?;
    let want = ec2::Wanted::unset_in(&store.settings());
    if !want.any() {
        info!("instance settings: all set, IMDS not asked");
        return Ok(());
    }
    if let Err(e) = ctx.network.wait(network::WAIT_LIMIT) {
        report::notice(format!(
            "instance settings from EC2 IMDSv2 not generated: the network is not up: {e}"
        ));
        return Ok(());
    }
    let imds = Imds::new(userdata::IMDS_ADDR, userdata::DEFAULT_TIMEOUT);
    let generated = match imds.session() {
        Ok(session) => ec2::generate(&session, want),
        Err(e) => {
            report::notice(format!("instance settings not generated: {e}"));
            return Ok(());
        }
    };
    for p in &generated.problems {
        report::notice(format!("instance settings from EC2 IMDSv2: {p}"));
    }
    if generated.patch.as_object().is_none_or(|m| m.is_empty()) {
        return Ok(());
    }
    let _ = store.delete(TX);
    match store.patch(TX, &generated.patch).and_then(|_| store.commit(TX)) {
        Ok(changed) => info!("instance settings from EC2 IMDSv2: {}", changed.join(", ")),
        Err(e) => {
            let _ = store.delete(TX);
            report::notice(format!("instance settings from EC2 IMDSv2 not stored: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &[Phase]) -> Vec<&'static str> {
        p.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn ec2_brings_the_network_up_before_user_data() {
        let table = super::super::PHASES;
        let plain = names(&phases(table, false));
        let ud = plain.iter().position(|n| *n == "user-data").unwrap();
        let net = plain.iter().position(|n| *n == "network").unwrap();
        assert!(ud < net, "elsewhere user data (and its network settings) come first: {plain:?}");
        assert!(!plain.contains(&"instance"), "{plain:?}");

        let on_ec2 = names(&phases(table, true));
        let at = |n: &str| on_ec2.iter().position(|x| *x == n).unwrap();
        assert!(at("datastore") < at("network"), "the network reads its settings: {on_ec2:?}");
        assert!(at("network") < at("user-data"), "{on_ec2:?}");
        assert!(at("user-data") < at("instance") && at("instance") < at("settings"), "{on_ec2:?}");
        assert_eq!(on_ec2.len(), plain.len() + 1, "nothing else changes: {on_ec2:?}");
        let mut sorted_plain = plain.clone();
        sorted_plain.push("instance");
        sorted_plain.sort();
        let mut sorted = on_ec2.clone();
        sorted.sort();
        assert_eq!(sorted, sorted_plain);
    }
}
