//! Who a CONNECT is: its client id, the listener's own authentication, the will's checks,
//! the hooks' `admit` (the policy's `on_connect` among them) and the user's device count.

use std::sync::Arc;

use rumqttd::protocol::{
    Connect, ConnectProperties, ConnectReturnCode, LastWill, LastWillProperties, Login,
};
use tokio::time::timeout;

use super::acl::topic_allowed;
use super::codec::Protocol;
use super::limits::DeviceSlot;
use super::{Admission, EdgeContext};
use crate::auth::acl::{Access, Client};
use crate::auth::{Credentials, Identity, Refusal};
use crate::hook::{self, Verdict};

/// Where a connection came in.
pub(super) struct Arrival {
    pub(super) id: u64,
    pub(super) peer: std::net::SocketAddr,
    pub(super) listener: Arc<super::Listener>,
}

/// A decoded CONNECT.
pub(super) struct ConnectPacket {
    pub(super) version: Protocol,
    pub(super) connect: Connect,
    pub(super) properties: Option<ConnectProperties>,
    pub(super) will: Option<LastWill>,
    pub(super) will_properties: Option<LastWillProperties>,
    pub(super) login: Option<Login>,
}

/// A CONNECT the hook layer refuses: the CONNACK code, an MQTT 5 reason string, and why.
pub(super) struct Refused {
    pub(super) code: ConnectReturnCode,
    pub(super) reason: Option<String>,
    pub(super) why: &'static str,
}

impl Refused {
    fn new(code: ConnectReturnCode, why: &'static str) -> Self {
        Self {
            code,
            reason: None,
            why,
        }
    }
}

/// Who the client is, once admitted.
pub(super) struct Admitted {
    /// Its client id (assigned, if it sent an empty one).
    pub(super) client_id: String,
    pub(super) identity: Identity,
    pub(super) device_slot: DeviceSlot,
    /// The client as hooks see it.
    pub(super) client: Arc<hook::Client>,
    /// Whether its uid was checked (credentials or a certificate), not merely claimed.
    pub(super) vouched: bool,
    /// A client id the server made up for an empty one (told to MQTT 5 clients).
    pub(super) assigned: Option<String>,
}

/// Client id, the broker's own auth, the will topic, then the policy's `on_connect`.
pub(super) async fn admit(
    ctx: &EdgeContext,
    packet: &ConnectPacket,
    arrival: &Arrival,
    certified_uid: Option<&str>,
) -> Result<Admitted, Refused> {
    let connect = &packet.connect;
    let (client_id, assigned) = client_id(connect)?;
    let credentials = Credentials {
        client_id: client_id.clone(),
        username: packet.login.as_ref().map(|l| l.username.clone()),
        password: packet
            .login
            .as_ref()
            .map(|l| l.password.clone().into_bytes()),
        peer: arrival.peer,
        protocol: packet.version,
        transport: arrival.listener.kind(),
    };
    let identity = authenticate(ctx, &credentials, arrival, certified_uid).await?;
    if let Some(will) = &packet.will {
        check_will(ctx, will, &identity, &credentials)?;
    }
    let client = Arc::new(hook::Client {
        uid: identity.uid.clone(),
        client_id: client_id.clone(),
        username: credentials.username.clone(),
        protocol: packet.version,
        listener: Arc::clone(&arrival.listener.name),
        peer: arrival.peer,
        clean_session: connect.clean_session,
        keep_alive: connect.keep_alive,
    });
    if let Verdict::Deny(reason) = ctx.hooks.admit(&client).await {
        tracing::debug!(reason = %crate::text::LoggedId(&reason), "connect denied by a hook");
        return Err(Refused {
            code: ConnectReturnCode::NotAuthorized,
            reason: Some(reason),
            why: "denied by policy",
        });
    }
    let device_slot = ctx
        .devices
        .admit(&ctx.limits, &identity.uid, &client_id, arrival.id)
        .map_err(|_| {
            ctx.im.metrics().count_limited("devices");
            Refused::new(
                ConnectReturnCode::QuotaExceeded,
                "too many devices for this user",
            )
        })?;
    Ok(Admitted {
        client_id,
        identity,
        device_slot,
        client,
        vouched: !matches!(arrival.listener.admission, Admission::Open) || certified_uid.is_some(),
        assigned,
    })
}

/// The client's id, or one made up for an empty one (then also returned to be told to an
/// MQTT 5 client); an empty id with a persistent session is refused, as MQTT says.
fn client_id(connect: &Connect) -> Result<(String, Option<String>), Refused> {
    if !connect.client_id.is_empty() {
        return Ok((connect.client_id.clone(), None));
    }
    if !connect.clean_session {
        return Err(Refused::new(
            ConnectReturnCode::ClientIdentifierNotValid,
            "empty client id with a persistent session",
        ));
    }
    let generated = format!("mqtt-im-{:016x}", rand::random::<u64>());
    Ok((generated.clone(), Some(generated)))
}

/// The listener's own authentication of `credentials`; a refusal is counted by its reason.
async fn authenticate(
    ctx: &EdgeContext,
    credentials: &Credentials,
    arrival: &Arrival,
    certified_uid: Option<&str>,
) -> Result<Identity, Refused> {
    let identity = match &arrival.listener.admission {
        Admission::Chain => ctx.auth.authenticate(credentials, certified_uid).await,
        Admission::Table(table) => table.authenticate(credentials, certified_uid).await,
        Admission::External(handler) => {
            let deadline = arrival.listener.connect_timeout;
            external(handler, credentials, deadline).await
        }
        Admission::Open => Ok(ctx.auth.admit_anyone(credentials, certified_uid)),
    };
    identity.map_err(|refusal| {
        let labels = crate::metrics::RefusalLabels {
            reason: refusal.label(),
        };
        ctx.im.metrics().auth_failures.get_or_create(&labels).inc();
        Refused::new(connack_code(refusal), "authentication failed")
    })
}

/// A will goes only where the topic ACL lets the client write, and never on an IM topic
/// (rumqttd would publish it into a tree the hook layer owns).
fn check_will(
    ctx: &EdgeContext,
    will: &LastWill,
    identity: &Identity,
    credentials: &Credentials,
) -> Result<(), Refused> {
    let Ok(topic) = std::str::from_utf8(&will.topic) else {
        return Err(Refused::new(
            ConnectReturnCode::NotAuthorized,
            "will message on an IM topic",
        ));
    };
    let client = Client {
        username: credentials.username.as_deref(),
        client_id: &credentials.client_id,
    };
    let file = ctx.auth.acl().map(AsRef::as_ref);
    if !topic_allowed(identity, &client, topic, Access::Write, false, file) {
        ctx.im.metrics().count_acl_denial("will");
        return Err(Refused::new(
            ConnectReturnCode::NotAuthorized,
            "will topic not allowed by the ACL",
        ));
    }
    if ctx.topics.strip_prefix(topic).is_some() {
        return Err(Refused::new(
            ConnectReturnCode::NotAuthorized,
            "will message on an IM topic",
        ));
    }
    Ok(())
}

/// Asks an embedding service's rumqttd auth handler, as rumqttd would (credentials required),
/// within `deadline` and with a panic caught: a handler that fails refuses.
async fn external(
    handler: &rumqttd::AuthHandler,
    credentials: &Credentials,
    deadline: std::time::Duration,
) -> Result<Identity, Refusal> {
    use futures::FutureExt;

    let (Some(username), Some(password)) = (&credentials.username, &credentials.password) else {
        return Err(Refusal::NotAuthorized);
    };
    let password = String::from_utf8_lossy(password).into_owned();
    let check = handler(credentials.client_id.clone(), username.clone(), password);
    let answer = timeout(deadline, std::panic::AssertUnwindSafe(check).catch_unwind()).await;
    match answer {
        Ok(Ok(true)) => Ok(Identity {
            uid: username.clone(),
            superuser: false,
            acl: None,
            expires: None,
        }),
        Ok(Ok(false)) => Err(Refusal::BadCredentials),
        Ok(Err(_)) | Err(_) => {
            tracing::warn!("the service's auth handler failed or overran; client refused");
            Err(Refusal::Unavailable)
        }
    }
}

/// The CONNACK code for an authentication refusal.
fn connack_code(refusal: Refusal) -> ConnectReturnCode {
    match refusal {
        Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
        Refusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
        Refusal::Unavailable => ConnectReturnCode::ServerUnavailable,
    }
}
