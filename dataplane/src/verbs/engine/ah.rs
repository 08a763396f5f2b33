//! Address handles: `ibv_create_ah` resolves a UD destination once (a container of the
//! caller's tenant with a verbs context on this host, or a registered container of it on
//! another host), as an RC QP's address vector is at RTR;
//! `ibv_destroy_ah` forgets it. A UD send names the handle, which is looked up in the sender's
//! own context only: a handle of another context names nothing.

use super::qp::gid_ipv4;
use super::{Context, Engine};
use crate::verbs::ids::{AttachmentId, PdId};
use crate::verbs::remote::Link;
use crate::verbs::VerbsError;
use freeflow_proto::verbs::ah::CreateAh;
use freeflow_proto::verbs::limits;
use std::net::Ipv4Addr;

/// What a UD send needs of its address handle: where it leads, and the fields of the global
/// route header the receiver sees.
#[derive(Debug, Clone, Copy)]
pub(in crate::verbs) struct Ah {
    pub(in crate::verbs) pd: PdId,
    /// The destination container's overlay address.
    pub(in crate::verbs) ip: Ipv4Addr,
    /// The engine that serves it, if not this one: another host's router or another shard.
    pub(in crate::verbs) link: Option<Link>,
    pub(in crate::verbs) traffic_class: u8,
    pub(in crate::verbs) hop_limit: u8,
    pub(in crate::verbs) sl: u8,
}

impl Engine {
    /// `ibv_create_ah`: a RoCE address (the GRH with the destination GID, as an RC QP's
    /// address vector) of a container of the caller's tenant with RDMA on this host.
    pub(super) fn create_ah(
        &mut self,
        attachment: AttachmentId,
        r: &CreateAh,
    ) -> Result<u32, VerbsError> {
        if r.is_global == 0 {
            return Err(VerbsError::Invalid(
                "a RoCE address needs the GRH (is_global) with the destination GID",
            ));
        }
        if r.sgid_index != 0 {
            return Err(VerbsError::Invalid("the GID table has one entry"));
        }
        if r.port_num != 1 {
            return Err(VerbsError::Invalid("the device has port 1 only"));
        }
        let caller = self.context_ref(attachment)?;
        if caller.ahs.len() >= limits::MAX_AH as usize {
            return Err(VerbsError::Limit("address handles"));
        }
        let ip = gid_ipv4(&r.dgid).ok_or_else(|| {
            VerbsError::Unreachable("the destination GID is not an IPv4-mapped address".into())
        })?;
        let tenant = caller.tenant;
        let local = self
            .contexts
            .values()
            .any(|c| c.container.ip == ip && c.tenant == tenant);
        let link = if local {
            None
        } else {
            match self.remote.link_of(ip, &caller.container.tenant) {
                Some(link) => Some(link),
                None => {
                    return Err(VerbsError::Unreachable(format!(
                        "{ip} is no container of tenant {} with RDMA on this host or a \
                         registered container of it on another host",
                        caller.container.tenant
                    )))
                }
            }
        };
        let ah = Ah {
            pd: PdId(r.pd),
            ip,
            link,
            traffic_class: r.traffic_class,
            hop_limit: r.hop_limit,
            sl: r.sl,
        };
        let ctx = super::context_mut(&mut self.contexts, attachment)?;
        Self::holding_pd(ctx, ah.pd, |ctx| {
            let handle = Self::new_handle(ctx);
            ctx.ahs.insert(handle, ah);
            Ok(handle)
        })
    }

    /// `ibv_destroy_ah`.
    pub(super) fn destroy_ah(
        &mut self,
        attachment: AttachmentId,
        handle: u32,
    ) -> Result<(), VerbsError> {
        let ctx = super::context_mut(&mut self.contexts, attachment)?;
        let ah = ctx
            .ahs
            .remove(&handle)
            .ok_or(VerbsError::NoSuchObject("address handle", handle))?;
        ctx.table.release_pd(ah.pd);
        Ok(())
    }
}

impl Context {
    /// The address handle `handle` of this context.
    pub(in crate::verbs) fn ah(&self, handle: u32) -> Option<&Ah> {
        self.ahs.get(&handle)
    }
}
