//! Scatter/gather lists resolved into memory views, and the copy of a message between them.

use crate::verbs::engine::Fault;
use crate::verbs::ids::PdId;
use crate::verbs::memory::ViewError;
use crate::verbs::{Key, MemView, Need, SharedSpan, VerbsTable};
use freeflow_proto::verbs::work::{Sge, MAX_SGE};

/// The memory of a resolved scatter/gather list, one view per entry.
pub(super) type Views<'a> = [Option<MemView<'a>>; MAX_SGE as usize];

/// Resolves a scatter/gather list into `views`; returns the total length.
pub(super) fn resolve_list<'a>(
    table: &'a VerbsTable,
    pd: PdId,
    sges: impl Iterator<Item = Sge>,
    need: Need,
    views: &mut Views<'a>,
) -> Result<u64, ()> {
    resolve_each(sges, views, |sge| {
        table.resolve(
            pd,
            Key::Local(sge.lkey),
            sge.addr,
            u64::from(sge.length),
            need,
        )
    })
}

/// As [`resolve_list`], into spans that keep their regions mapped while held (a zero-copy
/// send's payload).
pub(super) fn resolve_shared_list(
    table: &VerbsTable,
    pd: PdId,
    sges: impl Iterator<Item = Sge>,
    need: Need,
    spans: &mut [Option<SharedSpan>; MAX_SGE as usize],
) -> Result<u64, ()> {
    resolve_each(sges, spans, |sge| {
        table.resolve_shared(
            pd,
            Key::Local(sge.lkey),
            sge.addr,
            u64::from(sge.length),
            need,
        )
    })
}

/// Fills `slots` with what `resolve` makes of each element of `sges`; returns their total
/// length, or fails at the first element that does not resolve.
fn resolve_each<T, E>(
    sges: impl Iterator<Item = Sge>,
    slots: &mut [Option<T>],
    mut resolve: impl FnMut(&Sge) -> Result<T, E>,
) -> Result<u64, ()> {
    let mut total = 0u64;
    for (slot, sge) in slots.iter_mut().zip(sges) {
        *slot = Some(resolve(&sge).map_err(|_| ())?);
        total += u64::from(sge.length);
    }
    Ok(total)
}

/// Where bytes come from: registered memory or a WQE's inline data.
pub(super) enum Source<'s, 'a> {
    Views(&'s [Option<MemView<'a>>]),
    Bytes(&'s [u8]),
}

/// Copies `len` bytes of `src` into `dst` (whose total is at least `len`), piece by piece. A
/// piece computed outside its view is a [`Fault`] (the pieces are bounded by construction).
pub(super) fn copy(
    dst: &[Option<MemView<'_>>],
    src: Source<'_, '_>,
    len: u64,
) -> Result<(), Fault> {
    let mut dst_pieces = dst.iter().flatten();
    let mut current = dst_pieces.next();
    let mut at = 0usize;
    let mut left = len as usize;
    let mut put = |bytes: Option<&MemView<'_>>, data: Option<&[u8]>, n: usize| {
        // Copies n bytes from `bytes` (a view) or `data` into the destination pieces.
        let mut done = 0;
        while done < n {
            let Some(d) = current else {
                return Ok(());
            };
            if at == d.len() {
                current = dst_pieces.next();
                at = 0;
                continue;
            }
            let step = (n - done).min(d.len() - at);
            let target = d.slice(at, step)?;
            match (bytes, data) {
                (Some(v), _) => target.copy_from(&v.slice(done, step)?)?,
                (None, Some(b)) => {
                    let piece = b.get(done..done + step).ok_or(ViewError::OutOfRange {
                        offset: done,
                        len: step,
                        view_len: b.len(),
                    })?;
                    target.write_at(0, piece)?
                }
                (None, None) => {}
            }
            at += step;
            done += step;
        }
        Ok::<(), ViewError>(())
    };
    match src {
        Source::Views(views) => {
            for v in views.iter().flatten() {
                let n = v.len().min(left);
                put(Some(v), None, n)?;
                left -= n;
            }
        }
        Source::Bytes(b) => put(None, Some(&b[..left.min(b.len())]), left.min(b.len()))?,
    }
    Ok(())
}
