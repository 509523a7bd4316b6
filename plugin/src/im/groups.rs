//! Groups: management requests under owner/admin roles, the connections subscribed to each
//! group on this node, and cutting removed members off — at once on this node, and on other
//! nodes (or after an operator's command) through the store's removal log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{DeviceEvent, DeviceSink, ImError, ImService};
use crate::domain::{Conversation, Device, Gid, Uid};
use crate::store::{Role, StoreError};
use crate::wire::pb;

/// Users named in one management request.
const MAX_USERS_PER_REQUEST: usize = 1000;
/// Removals read from the store per poll.
const REMOVALS_PER_POLL: usize = 1000;

#[derive(Debug)]
struct Watcher {
    device: Device,
    connection: u64,
    sink: Arc<dyn DeviceSink>,
}

/// The connections on this node subscribed to each group (only members get in).
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    groups: Mutex<HashMap<Gid, Vec<Watcher>>>,
}

impl Watchers {
    fn watch(&self, gid: &Gid, device: &Device, connection: u64, sink: Arc<dyn DeviceSink>) {
        if let Ok(mut groups) = self.groups.lock() {
            let watchers = groups.entry(gid.clone()).or_default();
            watchers.retain(|w| w.connection != connection);
            watchers.push(Watcher {
                device: device.clone(),
                connection,
                sink,
            });
        }
    }

    fn unwatch(&self, gid: &Gid, connection: u64) {
        if let Ok(mut groups) = self.groups.lock() {
            if let Some(watchers) = groups.get_mut(gid) {
                watchers.retain(|w| w.connection != connection);
                if watchers.is_empty() {
                    groups.remove(gid);
                }
            }
        }
    }

    /// The connections to deliver a group message to, the sending device's excepted.
    pub(crate) fn sinks(&self, gid: &Gid, except: Option<&Device>) -> Vec<Arc<dyn DeviceSink>> {
        self.groups
            .lock()
            .map(|groups| {
                groups
                    .get(gid)
                    .map(|watchers| {
                        watchers
                            .iter()
                            .filter(|w| Some(&w.device) != except)
                            .map(|w| Arc::clone(&w.sink))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Takes `uid`'s connections out of the group and returns them.
    fn revoke(&self, gid: &Gid, uid: &Uid) -> Vec<Arc<dyn DeviceSink>> {
        let Ok(mut groups) = self.groups.lock() else {
            return Vec::new();
        };
        let Some(watchers) = groups.get_mut(gid) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Watcher>, Vec<Watcher>) =
            watchers.drain(..).partition(|w| &w.device.uid == uid);
        *watchers = kept;
        if watchers.is_empty() {
            groups.remove(gid);
        }
        gone.into_iter().map(|w| w.sink).collect()
    }
}

/// The users a request names, each a valid uid.
fn parse_users(uids: &[String]) -> Result<Vec<Uid>, ImError> {
    if uids.len() > MAX_USERS_PER_REQUEST {
        return Err(ImError::Invalid(format!(
            "at most {MAX_USERS_PER_REQUEST} users per request"
        )));
    }
    uids.iter()
        .map(|uid| Uid::parse(uid).map_err(|e| ImError::Invalid(e.to_string())))
        .collect()
}

/// The group a request names.
fn parse_gid(gid: &str) -> Result<Gid, ImError> {
    Gid::parse(gid).map_err(|e| ImError::Invalid(e.to_string()))
}

fn wire_role(role: Role) -> pb::Role {
    match role {
        Role::Member => pb::Role::Member,
        Role::Admin => pb::Role::Admin,
        Role::Owner => pb::Role::Owner,
    }
}

impl ImService {
    /// `uid`'s role in group `gid`; `None` if not a member.
    ///
    /// # Errors
    /// The store failed.
    pub async fn group_role(&self, uid: &Uid, gid: &Gid) -> Result<Option<Role>, ImError> {
        let group = Conversation::group(gid);
        let role = self.inner.store.role(uid, &group);
        Ok(self.metrics().store_call("role", role).await?)
    }

    /// `uid`'s role, refusing non-members (and telling a group that does not exist apart).
    pub(crate) async fn require_member(&self, uid: &Uid, gid: &Gid) -> Result<Role, ImError> {
        if let Some(role) = self.group_role(uid, gid).await? {
            return Ok(role);
        }
        match self.inner.store.members(&Conversation::group(gid)).await {
            Err(StoreError::NotFound(_)) => Err(ImError::NotFound(format!("no group {gid}"))),
            Ok(_) => Err(ImError::NotAuthorized(format!(
                "not a member of group {gid}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// A member's connection subscribed to the group: it gets the group's messages live.
    pub fn watch_group(
        &self,
        gid: &Gid,
        device: &Device,
        connection: u64,
        sink: Arc<dyn DeviceSink>,
    ) {
        self.inner.watchers.watch(gid, device, connection, sink);
    }

    /// The connection unsubscribed from the group or ended.
    pub fn unwatch_group(&self, gid: &Gid, connection: u64) {
        self.inner.watchers.unwatch(gid, connection);
    }

    pub(super) fn group_sinks(&self, gid: &Gid, except: &Device) -> Vec<Arc<dyn DeviceSink>> {
        self.inner.watchers.sinks(gid, Some(except))
    }

    /// Stops delivering the group to `uid`'s connections on this node and has them drop
    /// their subscription.
    pub(super) fn cut_off(&self, gid: &Gid, uid: &Uid) {
        for sink in self.inner.watchers.revoke(gid, uid) {
            sink.push(DeviceEvent::Revoked { group: gid.clone() });
        }
    }

    /// Applies removals logged in the store after `cursor` (by other nodes or by an
    /// operator) and advances `cursor`.
    pub(super) async fn apply_removals(&self, cursor: &AtomicU64) {
        let mut last = cursor.load(Ordering::Relaxed);
        loop {
            let removals = match self
                .inner
                .store
                .removals_since(last, REMOVALS_PER_POLL)
                .await
            {
                Ok(removals) => removals,
                Err(e) => {
                    tracing::debug!(error = %e, "removal log not readable now");
                    break;
                }
            };
            for removal in &removals {
                if let Some(gid) = removal.conversation.gid() {
                    self.cut_off(gid, &removal.uid);
                }
                last = removal.id;
            }
            if removals.len() < REMOVALS_PER_POLL {
                break;
            }
        }
        cursor.store(last, Ordering::Relaxed);
    }

    /// The group management requests.
    pub(super) async fn group_request(
        &self,
        uid: &Uid,
        kind: pb::request::Kind,
    ) -> Result<pb::response::Result, ImError> {
        use pb::request::Kind;
        use pb::response::Result as Reply;
        let store = &self.inner.store;
        match kind {
            Kind::GroupCreate(create) => {
                let gid = parse_gid(&create.gid)?;
                let mut others = parse_users(&create.members)?;
                others.retain(|member| member != uid);
                store
                    .create_group(&Conversation::group(&gid), uid, &others)
                    .await
                    .map_err(|e| match e {
                        StoreError::Conflict(_) => {
                            ImError::Invalid(format!("group {gid} exists already"))
                        }
                        other => ImError::Store(other),
                    })?;
                self.group_info(&gid).await
            }
            Kind::GroupAdd(add) => {
                let gid = parse_gid(&add.gid)?;
                let members = parse_users(&add.members)?;
                let mine = self.require_member(uid, &gid).await?;
                let role = match pb::Role::try_from(add.role) {
                    Ok(pb::Role::Unspecified | pb::Role::Member) => Role::Member,
                    Ok(pb::Role::Admin) => Role::Admin,
                    _ => return Err(ImError::Invalid("role must be MEMBER or ADMIN".into())),
                };
                let allowed = match role {
                    Role::Admin => mine == Role::Owner,
                    _ => mine >= Role::Admin,
                };
                if !allowed {
                    return Err(ImError::NotAuthorized(format!(
                        "only the owner adds admins, and owners or admins add members of {gid}"
                    )));
                }
                store
                    .add_members(&Conversation::group(&gid), &members, role)
                    .await?;
                self.group_info(&gid).await
            }
            Kind::GroupRemove(remove) => {
                let gid = parse_gid(&remove.gid)?;
                let members = parse_users(&remove.members)?;
                let mine = self.require_member(uid, &gid).await?;
                for target in &members {
                    let theirs = self.group_role(target, &gid).await?;
                    let allowed = target != uid
                        && match theirs {
                            None => mine >= Role::Admin,
                            Some(theirs) => {
                                mine == Role::Owner
                                    || (mine == Role::Admin && theirs == Role::Member)
                            }
                        };
                    if !allowed {
                        return Err(ImError::NotAuthorized(format!(
                            "you may not remove {target} from {gid} (owners remove anyone but \
                             themselves, admins remove members; use GroupLeave to leave)"
                        )));
                    }
                }
                self.remove_from_group(&gid, &members).await?;
                self.group_info(&gid).await
            }
            Kind::GroupLeave(leave) => {
                let gid = parse_gid(&leave.gid)?;
                let mine = self.require_member(uid, &gid).await?;
                if mine == Role::Owner {
                    self.hand_group_over(&gid, uid).await?;
                }
                self.remove_from_group(&gid, std::slice::from_ref(uid))
                    .await?;
                Ok(Reply::Group(pb::GroupInfo {
                    gid: leave.gid,
                    members: Vec::new(),
                }))
            }
            Kind::GroupMembers(members) => {
                let gid = parse_gid(&members.gid)?;
                self.require_member(uid, &gid).await?;
                self.group_info(&gid).await
            }
            Kind::MyGroups(_) => {
                let groups = store
                    .group_memberships(uid)
                    .await?
                    .into_iter()
                    .filter_map(|(group, role)| {
                        Some((group.gid()?.to_string(), wire_role(role) as i32))
                    })
                    .collect();
                Ok(Reply::Groups(pb::GroupList { groups }))
            }
            _ => Err(ImError::Invalid("not a group request".into())),
        }
    }

    /// Removes members from a group and cuts them off on this node at once (other nodes
    /// follow from the removal log).
    pub async fn remove_from_group(&self, gid: &Gid, uids: &[Uid]) -> Result<(), ImError> {
        let removed = self
            .inner
            .store
            .remove_members(&Conversation::group(gid), uids)
            .await?;
        for uid in &removed {
            self.cut_off(gid, uid);
        }
        Ok(())
    }

    /// The owner leaves: the first admin, else the first other member, becomes owner
    /// (members come highest role first, then by uid).
    async fn hand_group_over(&self, gid: &Gid, owner: &Uid) -> Result<(), ImError> {
        let members = self.inner.store.members(&Conversation::group(gid)).await?;
        let successor = members.iter().find(|m| &m.uid != owner);
        if let Some(successor) = successor {
            self.inner
                .store
                .add_members(
                    &Conversation::group(gid),
                    std::slice::from_ref(&successor.uid),
                    Role::Owner,
                )
                .await?;
        }
        Ok(())
    }

    async fn group_info(&self, gid: &Gid) -> Result<pb::response::Result, ImError> {
        let members = self.inner.store.members(&Conversation::group(gid)).await?;
        Ok(pb::response::Result::Group(pb::GroupInfo {
            gid: gid.to_string(),
            members: members
                .into_iter()
                .map(|m| pb::Member {
                    uid: m.uid.into(),
                    role: wire_role(m.role) as i32,
                    read_seq: m.read_seq,
                })
                .collect(),
        }))
    }
}
