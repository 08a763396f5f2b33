//! Each container's budget of the router's descriptors and mappings, shared by all its verbs
//! contexts, so that one container's objects cannot use up what the router has for everybody.
//!
//! What a verbs context costs the router, beyond its attach connection (which the attach
//! shares of `crate::admission` bound): its memory file (a descriptor), one mapping per memory
//! region, a pipe's write end per completion channel, and a mapped region per CQ, QP and SRQ
//! (its memory file is passed to the shim and closed). The per-context limits of
//! `freeflow_proto::verbs::limits` allow thousands of each, times the attachments a container
//! may hold: ~20 attachments' completion channels alone filled the router's RLIMIT_NOFILE, and
//! then every accept failed, for every container. Each of these costs one unit of the owning
//! container's budget; the one creation that would exceed it fails with the verb's resource
//! error (NoResources: ENOMEM from the shim, which is what rdma-core's mlx5 provider reports
//! when it runs out of a resource), and only for that container.
//!
//! The budget is a share of the smaller of the router's two pools, its open-file limit and its
//! mapping limit: [`SHARE_DIVISOR`]th of it, at least [`BUDGET_FLOOR`] (so that a router with
//! small limits still serves a program) and at most [`BUDGET_CEILING`].

use super::Context;
use crate::verbs::VerbsError;
use freeflow_proto::identity::NetnsId;
use std::collections::HashMap;

/// A container's budget is this fraction of the router's smaller pool (1/16: one container
/// can hold at most 1/16 of the router's descriptors or mappings through its verbs objects).
pub const SHARE_DIVISOR: u64 = 16;
/// The smallest budget: what a few verbs programs need (rc_pingpong holds 5 units: its memory
/// file, one memory region, channel, CQ and QP).
pub const BUDGET_FLOOR: usize = 64;
/// The largest budget, however large the router's limits.
pub const BUDGET_CEILING: usize = 8192;

/// The budget of each container for a router whose open-file limit is `open_files` and whose
/// mapping limit is `mappings`.
pub fn budget_for(open_files: u64, mappings: u64) -> usize {
    let share = open_files.min(mappings) / SHARE_DIVISOR;
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(BUDGET_FLOOR, BUDGET_CEILING)
}

/// The budget of each container for this process, from its current limits (the router raises
/// its soft open-file limit first). A limit that cannot be read counts as the floor's.
pub fn budget_of_this_process() -> usize {
    let open_files = freeflow_os::process::open_file_limit().map_or(0, |(soft, _)| soft);
    let mappings = freeflow_os::process::max_map_count().unwrap_or(0);
    budget_for(open_files, mappings)
}

/// The units each container holds, against one budget for each.
#[derive(Debug)]
pub(super) struct Budgets {
    per_container: usize,
    /// Units held, by container (its network namespace, as the attach shares know it).
    held: HashMap<NetnsId, usize>,
}

impl Budgets {
    pub(super) fn new(per_container: usize) -> Budgets {
        Budgets {
            per_container,
            held: HashMap::new(),
        }
    }

    /// Takes one unit of `ctx`'s container for `ctx`, unless the container has used its
    /// budget up.
    pub(super) fn charge(&mut self, ctx: &mut Context) -> Result<(), VerbsError> {
        let held = self.held.entry(ctx.container.netns).or_insert(0);
        if *held >= self.per_container {
            return Err(VerbsError::Budget {
                held: *held,
                budget: self.per_container,
            });
        }
        *held += 1;
        ctx.charged += 1;
        Ok(())
    }

    /// Gives back one unit `ctx` held.
    pub(super) fn refund(&mut self, ctx: &mut Context) {
        if ctx.charged > 0 {
            ctx.charged -= 1;
            self.release(ctx.container.netns, 1);
        }
    }

    /// Gives back everything a context that closed held.
    pub(super) fn refund_all(&mut self, ctx: &Context) {
        self.release(ctx.container.netns, ctx.charged);
    }

    fn release(&mut self, container: NetnsId, units: usize) {
        if let Some(held) = self.held.get_mut(&container) {
            *held = held.saturating_sub(units);
            if *held == 0 {
                self.held.remove(&container);
            }
        }
    }

    /// Runs `make` (which creates one object that costs a unit) with a unit of `ctx`'s
    /// container taken; the unit is given back if `make` fails.
    pub(super) fn charged<T>(
        &mut self,
        ctx: &mut Context,
        make: impl FnOnce(&mut Context) -> Result<T, VerbsError>,
    ) -> Result<T, VerbsError> {
        self.charge(ctx)?;
        make(ctx).inspect_err(|_| self.refund(ctx))
    }
}
