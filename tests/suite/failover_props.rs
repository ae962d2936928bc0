//! Property tests of the failover core over random fault sequences, on the
//! deterministic simulator (virtual clock, no I/O).
//!
//! Invariants checked inside the simulator after every step: never two
//! primaries at the same epoch; a node never acts as primary before its epoch
//! is durable; a node's durable epoch never decreases (across restarts too);
//! a secondary that hears a live primary over a clean link never promotes;
//! and after the last fault the pair converges to exactly one primary within
//! a bounded number of intervals.
//!
//! A failure prints its seed; `HASYNC_SIM_SEED=<seed> cargo test sim_seed`
//! replays exactly that run. `HASYNC_SIM_SEEDS=<n>` sets how many seeds run.

use std::time::Duration;

use hasync::failover::sim::{random_plan, Fault, FaultKind, Plan, Sim};
use hasync::failover::{CoreConfig, RecoveryPolicy, Role, TieBreak};
use proptest::prelude::*;

fn base() -> [CoreConfig; 2] {
    let mk = |n: &str, p: &str| CoreConfig {
        node_name: n.into(),
        peer_name: p.into(),
        priority: 100,
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_lost_threshold: 5,
        startup_wait: Duration::from_secs(2),
        recovery: RecoveryPolicy::BecomeSecondary,
        tie_break: TieBreak::LowerName,
        prepare_handover: None,
        quorum: hasync::failover::QuorumRule::None,
    };
    [mk("mx1", "mx2"), mk("mx2", "mx1")]
}

/// `name` from the environment as a number, or `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run_seed(seed: u64) {
    let plan = random_plan(seed, &base(), 8);
    if let Err(v) = Sim::new(plan.clone()).run() {
        panic!("{v}\nplan: {plan:#?}\nreplay with: HASYNC_SIM_SEED={seed} cargo test sim_seed");
    }
}

#[test]
fn sim_seeds() {
    if let Ok(one) = std::env::var("HASYNC_SIM_SEED") {
        run_seed(one.parse().expect("HASYNC_SIM_SEED must be an integer"));
        return;
    }
    let n: u64 = env_u64("HASYNC_SIM_SEEDS", 3000);
    let first: u64 = env_u64("HASYNC_SIM_FIRST", 0);
    let mut promotions = 0;
    let mut pushes = 0;
    let mut split = 0;
    let mut incomplete = 0;
    let mut handed = 0;
    for seed in first..first + n {
        let plan = random_plan(seed, &base(), 8);
        match Sim::new(plan.clone()).run() {
            Ok(out) => {
                promotions += out.promotions;
                pushes += out.queue_pushes;
                split += out.split_brain_alarms;
                incomplete += out.incomplete_refusals;
                handed += out.step_downs_handed_over;
            }
            Err(v) => panic!(
                "{v}\nplan: {plan:#?}\nreplay with: HASYNC_SIM_SEED={seed} cargo test sim_seed"
            ),
        }
    }
    // The generator must actually exercise failovers, not only quiet runs.
    assert!(
        promotions > n as usize,
        "only {promotions} promotions in {n} runs"
    );
    assert!(
        pushes > 0 && split > 0,
        "pushes {pushes}, split brains {split}"
    );
    // And nodes that hold back for an incomplete replica.
    assert!(
        n < 100 || incomplete > 0,
        "no promotion refused for an incomplete replica in {n} runs"
    );
    // And step-downs that hand the role over.
    assert!(
        n < 100 || handed > 0,
        "no step-down handed the role over in {n} runs"
    );
    println!(
        "{n} seeds: {promotions} promotions, {pushes} queue pushes, {split} split-brain alarms, {incomplete} promotions held back for an incomplete replica, {handed} step-downs handed over"
    );
}

fn fault_strategy() -> impl Strategy<Value = Fault> {
    let kind = prop_oneof![
        (50u64..4000).prop_map(|for_ms| FaultKind::Partition { for_ms }),
        (50u64..3000, 10u8..95).prop_map(|(for_ms, percent)| FaultKind::Loss { for_ms, percent }),
        (0usize..2, 1u64..4000).prop_map(|(node, down_ms)| FaultKind::Crash { node, down_ms }),
        (0usize..2, 1u64..3000).prop_map(|(node, for_ms)| FaultKind::SelfFail { node, for_ms }),
        (0usize..2).prop_map(|node| FaultKind::Switchover { node }),
        (0usize..2).prop_map(|node| FaultKind::Join { node }),
        (0usize..2).prop_map(|node| FaultKind::StepDown { node }),
    ];
    (0u64..12_000, kind).prop_map(|(at_ms, kind)| Fault { at_ms, kind })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Shrinkable counterpart of `sim_seeds`: proptest minimises a failing
    /// fault list and prints it.
    #[test]
    fn sim_fault_sequences(
        seed in any::<u64>(),
        mut faults in proptest::collection::vec(fault_strategy(), 0..8),
        prio in (0u8..3, 0u8..3),
        policy in 0u8..3,
        offset in 0u64..2000,
    ) {
        faults.sort_by_key(|f| f.at_ms);
        let last = faults.iter().map(|f| f.at_ms + 5000).max().unwrap_or(0);
        faults.push(Fault { at_ms: last, kind: FaultKind::Join { node: 0 } });
        faults.push(Fault { at_ms: last, kind: FaultKind::Join { node: 1 } });
        let mut configs = base();
        configs[0].priority = prio.0 * 50;
        configs[1].priority = prio.1 * 50;
        let recovery = [RecoveryPolicy::BecomeSecondary, RecoveryPolicy::RestoreRole, RecoveryPolicy::Off][policy as usize];
        configs[0].recovery = recovery;
        configs[1].recovery = recovery;
        let plan = Plan { seed, configs, start_offset_ms: offset, delay_ms: (0, 30), persist_ms: 5, fill_ms: 0, faults };
        let out = Sim::new(plan.clone()).run();
        prop_assert!(out.is_ok(), "{}", out.unwrap_err());
        let out = out.unwrap();
        prop_assert_eq!(out.final_roles.iter().filter(|r| **r == Some(Role::Primary)).count(), 1);
    }
}

/// The queue simulator (`queue::sim`): the real push and ingest sessions,
/// commit sequence and ledger against both nodes' disks with crash
/// semantics, failing operations, an MTA, a link that cuts and crashes of
/// either node; at quiescence every message is exactly once in one of the
/// queues or delivered. Replay one seed with `HASYNC_QUEUE_SIM_SEED=<seed>`.
#[test]
fn queue_sim_seeds() {
    use hasync::queue::sim::{run_seeds, QueueSim};
    if let Ok(one) = std::env::var("HASYNC_QUEUE_SIM_SEED") {
        let seed = one
            .parse()
            .expect("HASYNC_QUEUE_SIM_SEED must be an integer");
        match QueueSim::new(seed).run() {
            Ok(o) => println!("seed {seed}: {o:?}"),
            Err(v) => panic!("{v}"),
        }
        return;
    }
    let n: u64 = env_u64("HASYNC_QUEUE_SIM_SEEDS", 2_000);
    let first: u64 = env_u64("HASYNC_SIM_FIRST", 0);
    match run_seeds(first, n) {
        Ok(o) => {
            // The generator must exercise crashes of both nodes, cuts,
            // failing operations, roll-forwards, duplicates and refusals.
            assert!(
                o.pusher_crashes > 0
                    && o.ingester_crashes > 0
                    && o.cuts > 0
                    && o.io_errors > 0
                    && o.rolled_forward > 0
                    && o.duplicates > 0
                    && o.refused > 0
                    && o.delivered > 0,
                "{o:?}"
            );
            println!("{n} queue seeds: {o:?}");
        }
        Err((seed, v)) => panic!(
            "{v}\nreplay with: HASYNC_QUEUE_SIM_SEED={seed} cargo test --test tests queue_sim_seeds"
        ),
    }
}

/// The replica's group commit on its own simulator (`replica::commit_sim`), with the
/// receiver's gate for ops on paths and manifests:
/// `HASYNC_COMMIT_SIM_SEEDS=<n>` sets how many seeds run,
/// `HASYNC_COMMIT_SIM_SEED=<seed>` replays one.
#[test]
fn commit_sim_seeds() {
    use hasync::replica::commit_sim::{run_seeds, CommitSim};
    if let Ok(one) = std::env::var("HASYNC_COMMIT_SIM_SEED") {
        let seed = one
            .parse()
            .expect("HASYNC_COMMIT_SIM_SEED must be an integer");
        if let Err(v) = CommitSim::new(seed).run() {
            panic!("seed {seed}: {v}");
        }
        return;
    }
    let n: u64 = env_u64("HASYNC_COMMIT_SIM_SEEDS", 20_000);
    let first: u64 = env_u64("HASYNC_SIM_FIRST", 0);
    match run_seeds(first, n) {
        Ok(o) => {
            // The generator must exercise folding, failures and acks.
            assert!(o.acks > n && o.folded > 0 && o.failures > 0, "{o:?}");
            println!("{n} commit seeds: {o:?}");
        }
        Err((seed, v)) => panic!(
            "{v}\nreplay with: HASYNC_COMMIT_SIM_SEED={seed} cargo test --test tests commit_sim_seeds"
        ),
    }
}

/// The replication data path on its own simulator (`replica::data_sim`):
/// the real sender's decisions against a primary filesystem model with a
/// Maildir workload, an inotify-shaped tracker, a link that cuts, and a
/// replica model; at quiescence the replica holds exactly the primary's
/// tree. Replay one seed with `HASYNC_DATA_SIM_SEED=<seed>`.
#[test]
fn data_sim_seeds() {
    use hasync::replica::data_sim::{run_seeds, DataSim};
    // `HASYNC_DATA_SIM_CRASHES=0`: no crash and no fault (as the seeds that
    // found bugs before those were modelled run).
    let faults = std::env::var("HASYNC_DATA_SIM_CRASHES").map_or(true, |v| v != "0");
    if let Ok(one) = std::env::var("HASYNC_DATA_SIM_SEED") {
        let seed = one
            .parse()
            .expect("HASYNC_DATA_SIM_SEED must be an integer");
        // As the kept seeds run (`data_sim_seeds_that_found_bugs`), or as
        // a sweep runs the seed.
        let sim = match (std::env::var_os("HASYNC_DATA_SIM_KEPT").is_some(), faults) {
            (true, true) => DataSim::new(seed),
            (true, false) => DataSim::without_crashes(seed),
            (false, _) => DataSim::sweep(seed, faults),
        };
        match sim.run() {
            Ok(o) => println!("seed {seed}: {o:?}"),
            Err(v) => panic!("seed {seed}: {v}"),
        }
        return;
    }
    let n: u64 = env_u64("HASYNC_DATA_SIM_SEEDS", 1_000);
    let first: u64 = env_u64("HASYNC_SIM_FIRST", 0);
    match run_seeds(first, n, faults) {
        Ok(o) => {
            // The generator must exercise needs, cuts, overflows and races
            // (and crashes and a full disk when it has faults).
            assert!(
                o.batches > n
                    && o.cuts > 0
                    && o.overflows > 0
                    && o.raced_reads > 0
                    && o.needs > 0
                    && o.changes_while_comparing > 0
                    && o.settled_checks > n
                    && (!faults
                        // The group commit runs in half the seeds with faults.
                        || o.overtook_staged > 0
                            && o.staged_full_waits > 0
                            && o.replica_crashes > 0
                            && o.partial_removals > 0
                            && o.stage_failures > 0
                            && o.flush_failures > 0
                            && o.torn_files > 0
                            && o.primary_crashes > 0
                            && o.disk_full_turns > 0
                            && o.settled_checks_after_faults > n / 4
                            && o.second_tenures > 0
                            && o.reconciled_sessions > 0
                            && o.handed_over > 0
                            && o.handed_again > 0
                            && o.keep_failures > 0
                            && o.handed_refused > 0
                            && o.held_walks > 0
                            && o.holds > 0
                            && o.deletes_held > 0
                            && o.held_folders_renamed > 0
                            && o.handed_resent > 0
                            && o.tracker_stalls > 0),
                "{o:?}"
            );
            println!("{n} data-path seeds: {o:?}");
        }
        Err((seed, v)) => panic!(
            "{v}\nreplay with: HASYNC_DATA_SIM_SEED={seed} cargo test --test tests data_sim_seeds"
        ),
    }
}

/// Seeds whose failover once found a message on neither of its names on
/// the new primary (kept aside on the old one, out of the user's mailbox),
/// each traced and fixed: they must not drop one again. 263: a flag rename
/// failed on the replica and the primary deleted the old name before
/// sending the new one (the failed rename's hold); 1045: a chain of flag
/// renames of a message not sent yet kept moving its content behind its old
/// name's delete, past the end of a batch (the tracker keeps the new name
/// where the old one was queued); 668: a folder renamed after a message was
/// moved into it, the folder's name deleted on the replica before (the
/// rename into it made it again there: the folder's rename was sent as a
/// delete of the old name, the message in it), and, once that was fixed,
/// a folder deleted over the only copy of a message whose copy elsewhere
/// waited for room (a folder's delete now waits as its files' would);
/// 2871: a message moved out of a folder then deleted, the folder's delete
/// applied while the new name was staged and a cut discarding the staged
/// file (every staged file now lands before a folder's delete); 1323 (and
/// 1491, not traced): a name found gone at its sync deleted on the replica
/// while its new name was not sent yet (the first such delete is now
/// unsure, and the replica holds its only copy until the message lands
/// elsewhere or the delete comes again, sure); once that was in, 457 and
/// 2153: a Sync of the name queued before the replica held it sent the
/// sure delete (only the retry does now); 1397: the sure delete sent in a
/// later session, whose receiver held nothing (a session starts unsure);
/// 1453: a folder renamed while a comparison walked, found gone and deleted
/// with the only copy of a message in it (a folder with anything in it is
/// held until the sure delete); 9343, once the second look waited for the
/// tracker instead of a timer: a folder's rename refused, its old name's
/// sure delete sent before the comparison that would send the new name's
/// messages (the looks wait for a comparison asked for); 4757: the new name
/// refused for room on the replica, renamed again on the primary (an unsure
/// delete of the refused name let go of what waited for room there), and
/// the old name's sure delete applied before the newest name was sent
/// (what waits for room stays through an unsure delete); 10529 and 13859:
/// the new name refused for an I/O error on the replica (retried, or sent
/// again in the same batch) while the old name's sure delete went (it stays
/// unsure while another name of the message is on its way); 25475: the same
/// name sent again with the same content before its first copy's ack, the
/// second landing replacing the durable copy, and a failed flush discarding
/// it (a landing identical to what is there keeps the file); 9959: the new
/// name came as a rename in the same batch as the old name's sure delete (a
/// rename's new name counts as on its way); 19568: a copy refused for
/// room, the room back, and the original expunged before the copy was
/// sent again (what fits is still awaited a bounded while); 27621: after a
/// failover, a rename onto the only copy of a message whose other name
/// waited for room (a replacement is held as a delete is); 39462: a message
/// renamed onto another message's name, the rename refused for room, and
/// the old name's sure delete applied while the new name waited for room
/// (the source of a rename held for room stays as a failed rename's does);
/// 12576 (once the tracker model stalled): a rename read after the replica
/// held its source's unsure delete, sent as a sync of both names (the
/// replica lacked the source in the sender's index), made the source's
/// delete sure while the message's newest name was still unread (a name
/// renamed away is never deleted sure on that account).
#[test]
fn data_sim_seeds_that_dropped_a_message_at_a_failover() {
    use hasync::replica::data_sim::DataSim;
    for seed in [
        263, 457, 668, 1045, 1323, 1397, 1453, 1491, 2153, 2871, 4757, 9343, 9959, 10529, 12576,
        13859, 19568, 25475, 27621, 39462, 8884, 9291,
    ] {
        match DataSim::sweep(seed, true).run() {
            Ok(o) => {
                assert!(o.failovers > 0, "seed {seed} no longer fails over");
                assert_eq!(
                    o.dropped_at_failover, 0,
                    "seed {seed} dropped a message at its failover\nreplay with: HASYNC_DATA_SIM_TRACE=1 HASYNC_DATA_SIM_SEED={seed} cargo test --test tests data_sim_seeds"
                );
            }
            Err(v) => panic!("seed {seed}: {v}\nreplay with: HASYNC_DATA_SIM_SEED={seed} cargo test --test tests data_sim_seeds"),
        }
    }
}

/// Seeds beyond the default run that once failed, each for a sender bug or
/// a model flaw since fixed (docs/INVARIANTS.md says which): they run in
/// every `cargo test`, so none of those bugs comes back unseen.
#[test]
fn data_sim_seeds_that_found_bugs() {
    use hasync::replica::data_sim::DataSim;
    // 3330 5825 7664 7980: a file's ack applied after a rename planned
    // behind it; 4089 10467: a folder's other inode looked up under its
    // name after a rename in flight; 5525: a folder made again at a synced
    // name before its watch; 6747 7041 7623 10494 10825 12039 12335 13560
    // 17172 19489: the replica model landed a file under a file; 13516:
    // a folder's mtime unsaid after its parent's rename while its Mkdir
    // was unacknowledged; 13916: a link to a name whose op a cut lost;
    // 24666 25366: a re-made folder not noticed while its Mkdir was on its
    // way; 31293: a "ctime only" shortcut while a rename onto the name was
    // on its way (another message's content); 27729 41236: a file sent from
    // a folder's listing moved before the folder was watched (its old name
    // stayed on the replica); 114330: a file sent into a folder made again
    // under the name of one renamed away, before that rename was heard (the
    // rename carried the new file's content to the old folder's new name);
    // 161674: a folder renamed after its name was made again and the new one
    // sent first (the rename moved the wrong folder on the replica, and a
    // message of the renamed one never arrived); 172517: a file sent from a
    // folder's listing and deleted before the folder was watched (its name
    // stayed on the replica); 206676: a folder renamed away, its name made
    // again and the rename refused by the replica (the new folder was merged
    // into the old one's entries there, a stale message name kept).
    const SEEDS: [u64; 28] = [
        3330, 4089, 5525, 5825, 6747, 7041, 7623, 7664, 7980, 10467, 10494, 10825, 12039, 12335,
        13516, 13560, 13916, 17172, 19489, 24666, 25366, 27729, 31293, 41236, 114330, 161674,
        172517, 206676,
    ];
    // With crashes, a full disk and I/O errors on the replica (as modelled
    // now): 10111: a folder's Mkdir refused by an I/O error, its children
    // made it with the default mode, and the retry went to its old name
    // after a rename (the folder kept mode 755 on the replica); 83: after a
    // failover, a message the new primary sent landed on the former primary,
    // a cut lost its ack, its user deleted it, and the next comparison kept
    // it aside there as a genuine conflict (it was this node's own); 6764: a
    // folder made in a watched folder renamed before the tracker read its
    // creation was never watched (the tracker's rule, modelled here, and
    // the real tracker's unit test
    // `a_folder_made_before_a_rename_above_it_was_read_is_watched_under_its_new_name`).
    // 8529: a folder rename refused by an I/O error after the folder was
    // renamed on again (gone from both names here: no comparison was
    // asked for, and a stale name stayed on the replica).
    // 54234: a folder's `Mkdir` refused, then its times said in the same
    // batch marked it held (a rename later carried the wrong mode on).
    // 78: a new primary crashed after sending a message to the former
    // primary and before its takeover record was written again; its user
    // then deleted the message, and the former primary's copy was kept
    // aside as a conflict (the versions sent are now logged before they
    // leave, and the simulator no longer tolerates such a conflict).
    // 49456 (found once the simulator ran the receiver's own decisions): a
    // message rename refused by an I/O error, then its folder renamed before
    // the refusal's batch was acknowledged; the old name's delete went to
    // the folder's former name, and a stale `new/` name stayed. 56134: a
    // folder's `Mkdir` refused, its children made it with the default mode,
    // and the folder renamed before the refusal's batch was acknowledged
    // (the rename carried the wrong mode on; its retry, queued again before
    // the rename was planned, went to the old name). 177468: the same with a
    // subfolder's `Mkdir`, the folder made again under its old name (the
    // renamed folder never got the subfolder).
    // 158447: a folder renamed away and back (its events late) after a
    // comparison listed it: what the comparison queued there went as deletes
    // while it was away, and its listing, still taken for current (a
    // folder's ctime does not move when a folder above it is renamed),
    // kept it from being listed again: a message never reached the replica.
    // 7199 (with names turning from symlink to folder in the workload): a
    // message under a folder that was a symlink on the replica, sent before
    // the folder's `Mkdir`, was refused there and never sent again.
    // 177051 (after a failover): a folder renamed twice before the first
    // rename was planned, its index entry unsynced: the new name, already
    // gone, was synced (deleted on the replica with the folder's content),
    // a message renamed into the folder made it again there, and the second
    // rename took it for held: the folder's messages never arrived.
    // 381742: the simulator's own check, not the product: a version whose
    // content the new primary sent under another name after the failover
    // counts as held (the takeover record's sent log), so it is not kept
    // aside; the check now judges by the same record.
    // 400872: a message renamed over another whose source the replica
    // lacked (refused), then flagged before that batch was acknowledged:
    // the flag rename carried the overwritten message's content to the new
    // name, which was never corrected (another message's content there).
    // 4277: the simulator's own check again, once the former primary's
    // mark clears at `CaughtUp` and the primary settles its record: the
    // sent log that made a version held must still count for the check
    // after the record is gone.
    const FAULT_SEEDS: [u64; 15] = [
        78, 83, 4277, 6764, 7199, 8529, 10111, 49456, 54234, 56134, 158447, 177051, 177468, 381742,
        400872,
    ];
    for seed in FAULT_SEEDS {
        if let Err(v) = DataSim::new(seed).run() {
            panic!("seed {seed}: {v}\nreplay with: HASYNC_DATA_SIM_KEPT=1 HASYNC_DATA_SIM_SEED={seed} cargo test --test tests data_sim_seeds");
        }
    }
    // Run as a sweep runs them (odd seeds: the workload during comparisons,
    // a second tenure, a keep-aside that fails). 411: a genuine conflict
    // that could not be kept aside left its path protected until the
    // session ended (the new primary's ops on it refused meanwhile, for
    // good in a long session); 8285 (with that fixed): a rename over the
    // protected path replaced the conflict, lost; 5319 (renames of a
    // folder holding a protected conflict let through, the protection
    // moved along): without the move, the conflict lost at its new name.
    // 11494 (with a replica flush in flight as its session ends failing):
    // the failure, heard only by a later session's next flush, went unheard
    // when that session had nothing to send, and its manifest vouched for a
    // message whose data the disk had lost (zeros on the replica when the
    // pair settled); the session now hears it before it ends. 29986: the
    // simulator's own check, not the product: the pair taken for settled
    // while a failed flush's session (a comparison it cut short) was not
    // cut yet. 2213: a version kept aside, handed over, its acknowledgement
    // lost, and handed back to the node that kept it after a second
    // failover was kept twice there (the primary knew only its own slot
    // name). 1071 (once deletes wait for their content's new name): two
    // folders renamed away and back onto a conflict that could not be kept
    // aside held each other's renames, and every later op in them was
    // refused for a chain of holds that never ended (the pair never
    // settled).
    // 1971 (once a renamed file's queued Sync took the new name in place):
    // a message flagged, the rename failing here, then renamed back onto
    // its old name: the replica owed the old name to itself, and the
    // landing there deleted it (the pair never settled).
    // 38973 (once the tracker model stalls): a folder renamed, a message in
    // it renamed onto a conflict that could not be kept aside (its source
    // held), and a crash before the directory flush: the folder back under
    // its old name, the source there not held (a held source now keeps the
    // old names of folder renames not yet durable).
    // 21116 (once watches fail in the tracker model): a folder above one
    // whose watch failed renamed, and a folder made again at the old name
    // before the retry; the moved folder stayed unwatched and forgotten (a
    // flag change in it never replicated): remembered folders now follow
    // renames above them. 43050 (with that): such a folder renamed itself,
    // and so watched under its new name before the retry, reported what it
    // held and not a name gone from it: a remembered folder now compares
    // its store whenever it comes to be watched.
    for seed in [
        411, 1071, 1971, 2213, 5319, 8285, 11494, 21116, 29986, 38973, 43050,
    ] {
        if let Err(v) = DataSim::sweep(seed, true).run() {
            panic!("seed {seed}: {v}\nreplay with: HASYNC_DATA_SIM_SEED={seed} cargo test --test tests data_sim_seeds");
        }
    }
    for seed in SEEDS {
        // Found before crashes were modelled: replayed as they ran then.
        if let Err(v) = DataSim::without_crashes(seed).run() {
            panic!("seed {seed}: {v}\nreplay with: HASYNC_DATA_SIM_KEPT=1 HASYNC_DATA_SIM_CRASHES=0 HASYNC_DATA_SIM_SEED={seed} cargo test --test tests data_sim_seeds");
        }
    }
}
