//! A shard: one thread pinned to one core, serving its attachments run-to-completion.
//!
//! Loop: adopt or drop attachments handed over by the control thread, visit every
//! attachment's request ring, reap io_uring completions (hang-ups of attach connections and the
//! shard's doorbell), submit what was queued in one batch. After `spin` without work, park: raise
//! the parked flag on every request ring, look once more, and block in io_uring until the
//! doorbell or a connection fires. Idle costs no CPU; a shim rings the doorbell only when it
//! finds the flag raised. While it spins idle, the shard yields its core every
//! `IDLE_YIELD_PASSES` passes: when a program shares the core (it is not pinned away from the
//! router), the one waiting for the shard's completions would otherwise wait out the spin.
//!
//! Every shard runs a verbs engine for the verbs attachments it serves (a container's go to
//! shard `verbs::shard_of(its address)`), and drives that engine's transport: socket pairs to
//! the other shards (QPs whose two ends different shards serve) and connections to other
//! hosts' routers (shard 0 accepts them and hands each to the shard serving the container its
//! hello names). The transport's sockets are watched by this shard's io_uring (one-shot polls
//! tagged [`TRANSPORT_TAG`], armed again each pass as they fire), and read and written by the
//! engine's pass.

use crate::attachment::{Attachment, ConnectionEvent};
use crate::uring::Uring;
use crate::verbs::{AttachmentId, Conn, Engine, SiblingLink};
use crossbeam_queue::ArrayQueue;
use freeflow_proto::doorbell::EventFd;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Empty passes between two looks at the clock of an idle shard, each with a `sched_yield`:
/// a program spinning on the shard's core gets it within about this many passes (16 passes are
/// a few microseconds). Each step of a round trip between hosts waits for such a yield on
/// both hosts' shared cores: at 128 passes the bench's cross-host round trip was ~97 us, at 16
/// ~52 us, with the one-host round trip (a core of its own, where the yield returns at once)
/// unchanged.
const IDLE_YIELD_PASSES: u32 = 16;

/// The time slice a shard asks the kernel for (`FREEFLOW_SHARD_SLICE_US`; 0: the kernel's
/// default). A parked shard woken by its doorbell or a socket is the next step of somebody's
/// request; with the default slice (a few milliseconds) it waited, runnable, for the slice of
/// whatever ran on its core: traced during `freeflow-bench rdma --hosts 2`, 13-15 us at the
/// median, 160-190 us at p90, up to 12 ms. With the shortest slice the kernel grants, its
/// wake-up preempts (EEVDF: the earlier virtual deadline runs); its share of the core is
/// unchanged. On a core of its own it changes nothing. Asked for only once the shard has
/// connections to other hosts' routers, whose steps are such wake-ups: a shard serving one
/// host's programs spins (their posts need no wake-up), and finer slices would only cut its
/// turns on a core it shares into more pieces.
const SHARD_SLICE: Duration = Duration::from_micros(100);

/// The slice of [`SHARD_SLICE`], or as `FREEFLOW_SHARD_SLICE_US` says.
fn shard_slice() -> Duration {
    std::env::var("FREEFLOW_SHARD_SLICE_US")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(SHARD_SLICE, Duration::from_micros)
}

/// How long a shard treats its core as shared after it last found another task on it.
const SHARED_HOLD: Duration = Duration::from_millis(100);

/// Whether another task wants the shard's core, from the shard thread's count of involuntary
/// switches (preemptions, and `sched_yield`s that let another task run).
///
/// A shard that spins idle on a core it shares with a program (an unpinned one, or one host
/// per core as in `freeflow-bench rdma --hosts 2`) holds the core that program needs to post
/// and to see its completions, and its wake-ups then wait on the scheduler's fairness: traced,
/// that cost every step of a round trip between hosts tens to hundreds of microseconds. Such a
/// shard with connections to other hosts' routers therefore parks at its first empty pass (as
/// with `--spin-us 0`) while it was switched out, or left completions untaken, within the last
/// [`SHARED_HOLD`]; a single
/// check would not do, as a shard the scheduler favours keeps the core through its yields
/// while the program waits. On a core of its own the count does not grow, and the shard spins
/// out its budget as before; on one host it always does (its next work is its program's next
/// post, which then needs no doorbell).
#[derive(Debug, Default)]
struct CoreSharing {
    /// The count at the previous check.
    seen: u64,
    /// Until when the core counts as shared.
    until: Option<Instant>,
}

impl CoreSharing {
    /// Whether the core counted as shared at the last check and still does at `now` (no
    /// system call: the check itself is [`CoreSharing::core_shared`]).
    fn holding(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Whether another task took the core, or a program left the completions the shard
    /// published untaken (`completions_waiting`: see `Engine::completions_waiting`), within the
    /// last [`SHARED_HOLD`] (one `getrusage`).
    ///
    /// The switches alone miss the commonest case: a program spinning on the shard's core
    /// whose own `sched_yield`s put it behind the shard, so that the shard's yields return at
    /// once and it is never switched out, while the program, which needs the core to take the
    /// completion the shard just produced, waits out the shard's whole idle budget (traced:
    /// the shards then ran 56-75 us per wake-up, most of it spinning idle).
    fn core_shared(&mut self, completions_waiting: bool) -> bool {
        let now = Instant::now();
        if completions_waiting {
            self.until = Some(now + SHARED_HOLD);
        }
        if let Ok(count) = crate::sys::involuntary_switches() {
            if count != self.seen {
                self.seen = count;
                self.until = Some(now + SHARED_HOLD);
            }
        }
        self.holding(now)
    }
}

/// Work handed to a shard by the control thread.
pub enum ShardCommand {
    Adopt(Box<Attachment>),
    Detach(u32),
    /// The daemon's view of the cluster, for the verbs engine's transport to other hosts.
    Network(Box<freeflow_proto::control::NetworkView>),
    /// This host's registered containers (overlay address, tenant), for QPs between shards.
    Containers(Arc<Vec<(std::net::Ipv4Addr, String)>>),
    /// A connection from another host's router that another shard accepted for a container
    /// this shard serves.
    AdoptLink(Box<Conn>),
    /// A TCP-mode connect's kernel work and reply (crate::tcp::ShardConnect).
    Connect(Box<crate::tcp::ShardConnect>),
    /// Tests only (`ControlRequest::TestPanic`): the shard panics.
    #[cfg(debug_assertions)]
    TestPanic,
}

/// Counters a shard publishes; written only by the shard, read by the control thread.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub attached: AtomicUsize,
    pub requests: AtomicU64,
    pub wakeups: AtomicU64,
    pub parks: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Time asleep in io_uring while parked, in ns (added on each wake-up).
    pub parked_ns: AtomicU64,
    /// The shard thread's id once it runs (0 before), where the control thread reads its CPU
    /// time (`/proc/self/task/TID/schedstat`) at no cost to the shard.
    pub tid: AtomicU32,
    /// Containers with an attachment here.
    pub containers: AtomicUsize,
    /// The verbs engine's QPs, send work requests executed and their payload bytes.
    pub qps: AtomicUsize,
    pub verbs_ops: AtomicU64,
    pub verbs_bytes: AtomicU64,
    /// TCP-mode connects this shard started and answered (the control thread counts them all,
    /// by tenant, when it hands them over).
    pub tcp_connects: AtomicU64,
    /// Of those handed over, given back to the control thread (refused by the kernel, or a
    /// reply that did not fit).
    pub tcp_returned: AtomicU64,
}

/// This thread's id, from the link `/proc/thread-self` (`PID/task/TID`).
fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// Handle the control thread keeps for each shard.
pub struct ShardHandle {
    pub index: usize,
    pub core: Option<usize>,
    pub bell: Arc<EventFd>,
    pub inbox: Arc<ArrayQueue<ShardCommand>>,
    pub stats: Arc<ShardStats>,
    pub stop: Arc<AtomicBool>,
}

impl ShardHandle {
    /// Queues a command and wakes the shard. Gives the command back if the inbox is full.
    pub fn send(&self, command: ShardCommand) -> Result<(), ShardCommand> {
        self.inbox.push(command)?;
        if let Err(e) = self.bell.ring() {
            log::warn!("shard {} doorbell: {e}", self.index);
        }
        Ok(())
    }
}

/// Shared view of which attachments exist, for status; touched only on attach and detach.
pub type AttachedTable = Arc<Mutex<HashMap<u32, freeflow_proto::control::AttachedStatus>>>;

const BELL_TAG: u64 = 0;
/// The tag of the poll of the RDMA device's completion channel (`--rdma-device`).
#[cfg(feature = "rdma-hw")]
const DEVICE_TAG: u64 = 1 << 62;
/// The tags of the verbs transport's polls: this bit and the transport's token.
const TRANSPORT_TAG: u64 = 1 << 63;

fn conn_tag(slot: usize, generation: u32) -> u64 {
    ((slot as u64 + 1) << 32) | generation as u64
}

struct Slot {
    attachment: Attachment,
    generation: u32,
}

/// How a shard reaches the others: their inboxes and doorbells (index = shard).
pub type Siblings = Vec<(Arc<ArrayQueue<ShardCommand>>, Arc<EventFd>)>;

pub struct Shard {
    index: usize,
    siblings: Siblings,
    bell: Arc<EventFd>,
    inbox: Arc<ArrayQueue<ShardCommand>>,
    stats: Arc<ShardStats>,
    stop: Arc<AtomicBool>,
    attached_table: AttachedTable,
    spin: Duration,
    uring: Uring,
    slots: Vec<Option<Slot>>,
    next_generation: u32,
    served_total: u64,
    /// Every verbs context of the attachments this shard serves, and their queues.
    engine: Engine,
}

impl Shard {
    pub fn new(
        handle: &ShardHandle,
        attached_table: AttachedTable,
        spin: Duration,
    ) -> std::io::Result<Shard> {
        let mut uring = Uring::new(256)?;
        uring.poll_add(
            handle.bell.as_fd().as_raw_fd(),
            libc::POLLIN as u32,
            BELL_TAG,
        )?;
        Ok(Shard {
            index: handle.index,
            siblings: Vec::new(),
            bell: handle.bell.clone(),
            inbox: handle.inbox.clone(),
            stats: handle.stats.clone(),
            stop: handle.stop.clone(),
            attached_table,
            spin,
            uring,
            slots: Vec::new(),
            next_generation: 1,
            served_total: 0,
            engine: Engine::default(),
        })
    }

    /// The shard's containers' RC QPs run on this RDMA device (`--rdma-device`).
    #[cfg(feature = "rdma-hw")]
    pub fn set_device(&mut self, nic: crate::verbs::hw::Nic) {
        self.engine.set_device(nic);
        self.watch_device();
    }

    /// Waits (in io_uring) for the device's completion channel.
    #[cfg(feature = "rdma-hw")]
    fn watch_device(&mut self) {
        if let Some(fd) = self.engine.device_channel_fd() {
            if let Err(e) = self.uring.poll_add(fd, libc::POLLIN as u32, DEVICE_TAG) {
                log::warn!(
                    "shard {}: cannot watch the RDMA device's channel: {e}",
                    self.index
                );
            }
        }
    }

    /// Connects the shard to the router's others: `siblings` (every shard's inbox and
    /// doorbell, this one's included) and `links`, its socket pairs to them.
    pub fn link(&mut self, siblings: Siblings, links: Vec<SiblingLink>) {
        let shards = siblings.len();
        self.siblings = siblings;
        self.engine.set_shard(self.index, shards, links);
    }

    /// Runs until the stop flag is raised; then drops every attachment (closing their
    /// connections, which tells the shims).
    pub fn run(mut self) {
        self.stats
            .tid
            .store(current_tid().unwrap_or(0), Ordering::Relaxed);
        // Asked for once the shard serves QPs across hosts (see [`SHARD_SLICE`]).
        let mut slice = Some(shard_slice()).filter(|s| !s.is_zero());
        let mut idle_since = Instant::now();
        let mut spins: u32 = 0;
        let mut sharing = CoreSharing::default();
        while !self.stop.load(Ordering::Relaxed) {
            let mut work = self.take_commands();
            work += self.visit_all();
            work += self.run_engine();
            if self.uring.has_completions() {
                work += self.reap();
            }
            if let Err(e) = self.uring.submit_queued() {
                log::warn!("shard {}: io_uring submit: {e}", self.index);
            }
            if work > 0 {
                spins = 0;
                continue;
            }
            spins = spins.wrapping_add(1);
            // The idle clock starts at the first empty pass, so a busy shard reads no clock.
            if spins == 1 {
                idle_since = Instant::now();
                // Known to share its core (below): park at once. The 16 empty passes before
                // the next check, with their yield, took 10-30 us of the core per step of a
                // round trip between hosts, from the program waiting for it; and a shard that
                // spends its share spinning is no longer eligible to preempt when it wakes.
                if sharing.holding(idle_since) && self.engine.remote_connected() {
                    self.park();
                    spins = 0;
                    idle_since = Instant::now();
                }
                continue;
            }
            // Reading the clock on every empty pass would cost more than the pass itself.
            if !spins.is_multiple_of(IDLE_YIELD_PASSES) {
                std::hint::spin_loop();
                continue;
            }
            // A program polling on this core waits for this shard's work while the shard spins:
            // let it run (sched_yield returns at once when nothing else wants the core).
            std::thread::yield_now();
            // A shard serving QPs across hosts waits on the other host's router between steps;
            // if another task wants this core meanwhile, park now rather than spin out the
            // budget. (On one host the shard's next work is its program's next post: there it
            // keeps spinning, so that the post needs no doorbell.)
            let remote = self.engine.remote_connected();
            if remote {
                if let Some(slice) = slice.take() {
                    self.ask_for_slice(slice);
                }
            }
            let shared = remote && sharing.core_shared(self.engine.completions_waiting());
            // A shard without attachments has no ring to watch: its work (connects handed
            // over) comes with a ring of its doorbell, so spinning would only take CPU from
            // the programs whose connects it serves.
            let ringless = self.slots.is_empty();
            if !shared && !ringless && idle_since.elapsed() < self.spin {
                continue;
            }
            self.park();
            spins = 0;
            idle_since = Instant::now();
        }
        let ids: Vec<u32> = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.attachment.id)
            .collect();
        for id in ids {
            self.detach_id(id, "router shutting down");
        }
    }

    /// Asks the kernel for a time slice of `slice` for this thread (see [`SHARD_SLICE`]).
    fn ask_for_slice(&self, slice: Duration) {
        match crate::sys::set_thread_slice(slice) {
            Ok(applied) => log::debug!("shard {}: time slice {applied:?}", self.index),
            Err(e) => log::warn!(
                "shard {}: cannot ask for a {slice:?} time slice ({e}); its wake-ups wait for \
                 the slice of whatever runs on its core",
                self.index
            ),
        }
    }

    fn take_commands(&mut self) -> usize {
        let mut n = 0;
        while let Some(command) = self.inbox.pop() {
            n += 1;
            match command {
                ShardCommand::Adopt(attachment) => self.adopt(*attachment),
                ShardCommand::Detach(id) => self.detach_id(id, "container unregistered"),
                ShardCommand::Network(network) => self.engine.set_network(&network),
                ShardCommand::Containers(containers) => {
                    self.engine.set_local(containers.iter().cloned())
                }
                ShardCommand::AdoptLink(conn) => self.engine.transport().adopt_incoming(*conn),
                ShardCommand::Connect(connect) => self.serve_connect(*connect),
                #[cfg(debug_assertions)]
                ShardCommand::TestPanic => {
                    panic!(
                        "test panic of shard {} (requested on router.ctl)",
                        self.index
                    )
                }
            }
        }
        n
    }

    fn serve_connect(&mut self, connect: crate::tcp::ShardConnect) {
        use crate::tcp::ShardConnected;
        let counter = match connect.serve() {
            ShardConnected::Answered => &self.stats.tcp_connects,
            ShardConnected::Returned => &self.stats.tcp_returned,
            ShardConnected::Dropped => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn adopt(&mut self, attachment: Attachment) {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let index = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let fd = attachment.conn.as_raw_fd();
        if let Err(e) = self.uring.poll_add(
            fd,
            (libc::POLLIN | libc::POLLRDHUP) as u32,
            conn_tag(index, generation),
        ) {
            log::warn!(
                "shard {}: cannot watch attachment {}: {e}",
                self.index,
                attachment.id
            );
            self.forget(attachment.id);
            return;
        }
        if attachment.kind == freeflow_proto::attach::ShimKind::Verbs {
            self.engine
                .open(attachment.engine_id(), attachment.container.clone());
        }
        self.slots[index] = Some(Slot {
            attachment,
            generation,
        });
        self.stats.attached.fetch_add(1, Ordering::Relaxed);
        self.count_containers();
    }

    /// Publishes how many containers have an attachment here.
    fn count_containers(&self) {
        let mut names: Vec<&str> = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.attachment.container.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        self.stats.containers.store(names.len(), Ordering::Relaxed);
    }

    fn visit_all(&mut self) -> usize {
        let mut served = 0;
        let mut broken = Vec::new();
        for slot in self.slots.iter_mut().flatten() {
            match slot.attachment.visit(&mut self.engine) {
                Ok(v) => served += v.served,
                Err(e) => {
                    broken.push((slot.attachment.id, format!("ring protocol violation: {e}")))
                }
            }
            if let Some(why) = slot.attachment.take_violation() {
                broken.push((slot.attachment.id, why));
            }
        }
        for (id, why) in broken {
            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            self.detach_id(id, &why);
        }
        if served > 0 {
            self.publish_engine_stats();
            self.served_total += served as u64;
            self.stats
                .requests
                .store(self.served_total, Ordering::Relaxed);
        }
        served
    }

    /// Executes posted work requests and flushes; detaches attachments that broke their queues.
    fn run_engine(&mut self) -> usize {
        let work = self.engine.poll();
        for (AttachmentId(id), why) in self.engine.take_broken() {
            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            self.detach_id(id, &why);
        }
        for (shard, conn) in self.engine.transport().take_handoff() {
            let Some((inbox, bell)) = self.siblings.get(shard) else {
                continue;
            };
            // A full inbox drops the connection: the other router connects again.
            if inbox.push(ShardCommand::AdoptLink(Box::new(conn))).is_ok() {
                let _ = bell.ring();
            }
        }
        self.watch_transport();
        if work > 0 {
            self.publish_engine_stats();
        }
        work
    }

    /// Publishes the engine's QPs, operations and bytes for status.
    fn publish_engine_stats(&self) {
        let (counters, qps) = self.engine.counters();
        self.stats.qps.store(qps, Ordering::Relaxed);
        self.stats.verbs_ops.store(counters.ops, Ordering::Relaxed);
        self.stats
            .verbs_bytes
            .store(counters.bytes, Ordering::Relaxed);
    }

    /// Arms the polls of the transport's sockets that need it, and closes the sockets it let
    /// go once their polls are cancelled (a poll in flight holds the socket open).
    fn watch_transport(&mut self) {
        let uring = &mut self.uring;
        let transport = self.engine.transport();
        transport.watch(|fd, events, token| {
            if let Err(e) = uring.poll_add(fd, events, TRANSPORT_TAG | token) {
                log::warn!("verbs transport: cannot watch a socket: {e}");
            }
        });
        let closing = transport.take_closing();
        if !closing.is_empty() {
            for (token, _) in &closing {
                let _ = self.uring.cancel(TRANSPORT_TAG | token);
                let _ = self.uring.cancel(TRANSPORT_TAG | token | 1);
            }
            let _ = self.uring.submit_queued();
            drop(closing);
        }
    }

    fn reap(&mut self) -> usize {
        let mut events = Vec::new();
        let n = self.uring.drain(|tag, result| events.push((tag, result)));
        for (tag, result) in events {
            if tag & TRANSPORT_TAG != 0 {
                self.engine.transport().ready(tag & !TRANSPORT_TAG, result);
                continue;
            }
            #[cfg(feature = "rdma-hw")]
            if tag == DEVICE_TAG {
                self.engine.device_take_events();
                self.watch_device();
                continue;
            }
            if tag == BELL_TAG {
                self.bell.drain();
                if let Err(e) = self.uring.poll_add(
                    self.bell.as_fd().as_raw_fd(),
                    libc::POLLIN as u32,
                    BELL_TAG,
                ) {
                    log::warn!("shard {}: re-arming doorbell: {e}", self.index);
                }
                continue;
            }
            let index = (tag >> 32) as usize - 1;
            let generation = tag as u32;
            let Some(Some(slot)) = self.slots.get(index) else {
                continue;
            };
            if slot.generation != generation {
                continue; // a completion for an attachment that is gone
            }
            if result == -libc::ECANCELED {
                continue;
            }
            self.on_connection_event(index);
        }
        n
    }

    /// The attach connection is readable or hung up. After the handshake a shim sends nothing
    /// on it but, for a verbs shim, its memory file (see `Attachment::on_connection_readable`);
    /// anything else ends the attachment.
    fn on_connection_event(&mut self, index: usize) {
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let id = slot.attachment.id;
        match slot.attachment.on_connection_readable(&mut self.engine) {
            ConnectionEvent::Quiet => {
                let (fd, generation) = (slot.attachment.conn.as_raw_fd(), slot.generation);
                if self
                    .uring
                    .poll_add(
                        fd,
                        (libc::POLLIN | libc::POLLRDHUP) as u32,
                        conn_tag(index, generation),
                    )
                    .is_err()
                {
                    self.detach_id(id, "cannot re-arm connection watch");
                }
            }
            ConnectionEvent::Closed => self.detach_id(id, "process went away"),
            ConnectionEvent::Violation(why) => {
                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                self.detach_id(id, &why);
            }
        }
    }

    fn detach_id(&mut self, id: u32, why: &str) {
        let Some((index, slot)) = self
            .slots
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| Some((i, s.take_if(|s| s.attachment.id == id)?)))
        else {
            return;
        };
        // The poll on this connection may still be in flight: cancel it and submit before the
        // fd closes, so the kernel never sees a stale fd number in a queued entry.
        let _ = self.uring.cancel(conn_tag(index, slot.generation));
        let _ = self.uring.submit_queued();
        let a = &slot.attachment;
        let held = match self.engine.close(a.engine_id()) {
            Some(h) if h.pds + h.mrs + h.cqs + h.qps > 0 => format!(
                " (freed {} PDs, {} MRs, {} CQs, {} QPs)",
                h.pds, h.mrs, h.cqs, h.qps
            ),
            _ => String::new(),
        };
        log::info!(
            "shard {}: detached {} ({} shim of container {}, pid {}): {why}{held}",
            self.index,
            a.id,
            a.kind.name(),
            a.container.name,
            a.pid
        );
        drop(slot);
        self.forget(id);
        self.stats.attached.fetch_sub(1, Ordering::Relaxed);
        self.count_containers();
        self.publish_engine_stats();
    }

    fn forget(&self, id: u32) {
        if let Ok(mut table) = self.attached_table.lock() {
            table.remove(&id);
        }
    }

    /// Parks until the doorbell rings or a connection event arrives. Aborts the park if any
    /// request ring turns out not to be empty once its flag is up.
    fn park(&mut self) {
        let mut raised = 0;
        let mut busy = false;
        let mut broken = Vec::new();
        for slot in self.slots.iter_mut().flatten() {
            match slot.attachment.prepare_park() {
                Ok(true) => raised += 1,
                Ok(false) => {
                    busy = true;
                    break;
                }
                Err(e) => broken.push((slot.attachment.id, e)),
            }
        }
        let _ = raised;
        let plan = if busy {
            crate::verbs::ParkPlan::default()
        } else {
            self.engine.prepare_park()
        };
        if !busy
            && !plan.busy
            && broken.is_empty()
            && self.inbox.is_empty()
            && !self.stop.load(Ordering::Relaxed)
        {
            self.stats.parks.fetch_add(1, Ordering::Relaxed);
            let parked_at = Instant::now();
            // A verbs retry timer (RNR, transport retry, a full CQ) bounds the sleep.
            let waited = match plan.deadline {
                Some(d) => self
                    .uring
                    .submit_and_wait_timeout(d.saturating_duration_since(Instant::now())),
                None => self.uring.submit_and_wait(),
            };
            if let Err(e) = waited {
                log::warn!("shard {}: io_uring wait: {e}", self.index);
                std::thread::sleep(Duration::from_millis(1));
            }
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            let parked = parked_at.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            self.stats.parked_ns.fetch_add(parked, Ordering::Relaxed);
        }
        for slot in self.slots.iter().flatten() {
            slot.attachment.unpark();
        }
        self.engine.unpark();
        for (id, e) in broken {
            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            self.detach_id(id, &format!("ring protocol violation: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard thread that yields on a core another thread keeps busy is switched out, and its
    /// next check finds the core shared.
    #[test]
    fn a_yield_to_another_thread_on_the_core_marks_it_shared() {
        let core = core_affinity::get_core_ids()
            .and_then(|cores| cores.last().copied())
            .expect("the machine's cores");
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                core_affinity::set_for_current(core);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        assert!(core_affinity::set_for_current(core), "pinning the test");
        let mut sharing = CoreSharing {
            seen: crate::sys::involuntary_switches().expect("getrusage"),
            until: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut shared = false;
        for _ in 0..1_000_000 {
            if shared || Instant::now() > deadline {
                break;
            }
            std::thread::yield_now();
            shared = sharing.core_shared(false);
        }
        stop.store(true, Ordering::Relaxed);
        busy.join().expect("the busy thread");
        assert!(
            shared,
            "never switched out by a busy thread on core {}",
            core.id
        );
        assert!(sharing.until.is_some_and(|until| until > Instant::now()));
    }

    /// Completions the shard published and its program has not taken mark the core shared
    /// for the hold, whatever the switch count says.
    #[test]
    fn completions_left_untaken_mark_the_core_shared() {
        let mut sharing = CoreSharing {
            seen: crate::sys::involuntary_switches().expect("getrusage"),
            until: None,
        };
        let before = Instant::now();
        assert!(sharing.core_shared(true));
        assert!(sharing
            .until
            .is_some_and(|until| until >= before + SHARED_HOLD));
    }
}
