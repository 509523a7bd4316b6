//! `PusherSet`, `PusherRemove` and `PusherList`: a device registers how a push gateway
//! reaches its app; the user sees and removes the pushers of all its devices.

use super::{ImError, ImService};
use crate::domain::Uid;
use crate::push::{validate, PusherError};
use crate::store::{now_ms, Device, Pusher, PusherSaved};
use crate::text::LoggedId;
use crate::wire::pb;

impl ImService {
    /// Stores the device's pusher; one another device held moves here.
    pub(super) async fn set_pusher(
        &self,
        device: &Device,
        set: pb::PusherSet,
    ) -> Result<pb::response::Result, ImError> {
        let settings = &self.inner.push;
        let pusher = validate(settings, device, set, now_ms()).map_err(refusal)?;
        let per_device = settings.max_pushers_per_device;
        let saved = self
            .metrics()
            .store_call(
                "set_pusher",
                self.inner.store.set_pusher(&pusher, per_device),
            )
            .await?;
        match saved {
            PusherSaved::Full => Err(ImError::Invalid(format!(
                "a device may hold at most {per_device} pushers: remove one first"
            ))),
            PusherSaved::Saved { displaced } => {
                if let Some(previous) = displaced {
                    tracing::info!(
                        app_id = %LoggedId(&pusher.app_id),
                        from_uid = %previous.uid,
                        from_client_id = %LoggedId(&previous.client_id),
                        "pusher moved to another device"
                    );
                }
                Ok(reply(vec![pusher]))
            }
        }
    }

    /// Removes one of the user's pushers.
    pub(super) async fn remove_pusher(
        &self,
        uid: &Uid,
        remove: pb::PusherRemove,
    ) -> Result<pb::response::Result, ImError> {
        let removing =
            self.inner
                .store
                .remove_pusher(uid, &remove.app_id, &remove.pushkey, "removed");
        match self.metrics().store_call("remove_pusher", removing).await? {
            Some(pusher) => Ok(reply(vec![pusher])),
            None => Err(ImError::NotFound("no such pusher of this user".into())),
        }
    }

    /// The user's pushers, on all of its devices.
    pub(super) async fn list_pushers(&self, uid: &Uid) -> Result<pb::response::Result, ImError> {
        let listing = self.inner.store.pushers(uid);
        Ok(reply(self.metrics().store_call("pushers", listing).await?))
    }
}

fn refusal(error: PusherError) -> ImError {
    match error {
        PusherError::Off | PusherError::ContentOff | PusherError::UnknownGateway => {
            ImError::NotAuthorized(error.to_string())
        }
        PusherError::Invalid(_) => ImError::Invalid(error.to_string()),
    }
}

fn reply(pushers: Vec<Pusher>) -> pb::response::Result {
    pb::response::Result::Pushers(pb::Pushers {
        pushers: pushers.into_iter().map(to_wire).collect(),
    })
}

fn to_wire(pusher: Pusher) -> pb::Pusher {
    pb::Pusher {
        app_id: pusher.app_id,
        pushkey: pusher.pushkey,
        url: pusher.url,
        format: pusher.format,
        lang: pusher.lang,
        data_json: pusher.data_json,
        client_id: pusher.device.client_id,
        created: pusher.created_ms,
    }
}
