//! The CONNECT handshake: decode, client id, the listener's own auth, the hooks' `admit`
//! (the policy's `on_connect` among them), the client id's take-over, the private MQTT 5
//! link to rumqttd when the client needs it from the start, and the CONNACK to the client.

use std::sync::Arc;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill,
    LastWillProperties, Login, Packet,
};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

use super::acl::topic_allowed;
use super::codec::{self, kind, read_frame, Protocol, READ_SMALL};
use super::limits::DeviceSlot;
use super::links::LinkClaim;
use super::session::Terms;
use super::transport::{ClientStream, Upgraded};
use super::upstream::{LinkRequest, Upstream};
use super::{Admission, EdgeContext, EdgeError};
use crate::auth::acl::{Access, Client};
use crate::auth::{Credentials, Identity, Refusal};
use crate::domain::{Device, Uid};
use crate::hook::{self, Verdict};

/// A client admitted, with its link to rumqttd if it needs one from the start.
pub(super) struct Established {
    /// What its session starts from.
    pub(super) terms: Terms,
    /// This connection's place in its user's device count.
    pub(super) device_slot: DeviceSlot,
    pub(super) client: ClientStream,
    /// Bytes the client sent after its CONNECT.
    pub(super) client_in: BytesMut,
    /// The CONNACK, not yet written.
    pub(super) client_out: BytesMut,
    pub(super) upstream: Upstream,
    /// This connection's hold on its client id (and its rumqttd link).
    pub(super) link: LinkClaim,
}

/// A decoded CONNECT.
struct ConnectPacket {
    version: Protocol,
    connect: Connect,
    properties: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_properties: Option<LastWillProperties>,
    login: Option<Login>,
}

/// A CONNECT the hook layer refuses: the CONNACK code, an MQTT 5 reason string, and why.
struct Refused {
    code: ConnectReturnCode,
    reason: Option<String>,
    why: &'static str,
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
struct Admitted {
    /// Its client id (assigned, if it sent an empty one).
    client_id: String,
    identity: Identity,
    device_slot: DeviceSlot,
    /// The client as hooks see it.
    client: Arc<hook::Client>,
    /// Whether its uid was checked (credentials or a certificate), not merely claimed.
    vouched: bool,
    /// A client id the server made up for an empty one (told to MQTT 5 clients).
    assigned: Option<String>,
}

/// Where a connection came in.
pub(super) struct Arrival {
    pub(super) id: u64,
    pub(super) peer: std::net::SocketAddr,
    pub(super) listener: Arc<super::Listener>,
}

/// Runs the handshake on a new client stream.
pub(super) async fn handshake(
    upgraded: Upgraded,
    ctx: Arc<EdgeContext>,
    arrival: &Arrival,
) -> Result<Established, EdgeError> {
    let id = arrival.id;
    let Upgraded {
        mut stream,
        certified_uid,
    } = upgraded;
    let mut client_in = BytesMut::with_capacity(READ_SMALL);
    let packet = read_connect(&mut stream, &mut client_in, &arrival.listener).await?;
    let version = packet.version;
    let admitted = match admit(&ctx, &packet, arrival, certified_uid.as_deref()).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            refuse(&mut stream, version, refused.code, refused.reason).await;
            return Err(EdgeError::Refused(refused.why));
        }
    };
    let (keep_alive, clean_session) = (packet.connect.keep_alive, packet.connect.clean_session);
    let username = packet.login.as_ref().map(|l| l.username.clone());
    let max_packet = packet
        .properties
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .and_then(|size| usize::try_from(size).ok());
    let receive_max = packet.properties.as_ref().and_then(|p| p.receive_maximum);
    let link = ctx.links.claim(&admitted.client_id, id).await?;
    let request = link_request(packet, &admitted.client_id);
    let (upstream, upstream_session) =
        match link_at_connect(&ctx, id, request, &admitted.client_id).await {
            Ok(linked) => linked,
            Err(LinkRefused(code)) => {
                refuse(&mut stream, version, code, None).await;
                return Err(EdgeError::Refused("rumqttd refused the connection"));
            }
            Err(LinkFailed(e)) => return Err(e),
        };
    let im = im_device(&admitted);
    let kept_im = im.as_ref().is_some_and(|device| ctx.has_session(device));
    let session_present = !clean_session && (upstream_session || kept_im);
    // Outgoing buffers start empty and grow when needed.
    let mut client_out = BytesMut::new();
    let properties = admitted.assigned.map(|id| ConnAckProperties {
        assigned_client_identifier: Some(id),
        ..Default::default()
    });
    write_connack(
        &mut client_out,
        version,
        session_present,
        ConnectReturnCode::Success,
        properties,
    )?;
    let terms = Terms {
        version,
        client: admitted.client,
        listener: Arc::clone(&arrival.listener),
        client_id: admitted.client_id,
        im,
        username,
        identity: admitted.identity,
        keep_alive,
        clean_session,
        max_packet,
        receive_max,
    };
    Ok(Established {
        terms,
        device_slot: admitted.device_slot,
        client: stream,
        client_in,
        client_out,
        upstream,
        link,
    })
}

/// Why the link to rumqttd did not open at CONNECT.
enum LinkError {
    /// rumqttd answered with this code (the client gets it too).
    LinkRefused(ConnectReturnCode),
    /// The link failed.
    LinkFailed(EdgeError),
}
use LinkError::{LinkFailed, LinkRefused};

/// Opens the link to rumqttd at once when the client needs it from the start — for a will,
/// and for a session rumqttd keeps (persistent: resumed; clean: discarded) — and returns
/// it with whether rumqttd had a session; otherwise it stays to open on first need.
async fn link_at_connect(
    ctx: &Arc<EdgeContext>,
    id: u64,
    request: LinkRequest,
    client_id: &str,
) -> Result<(Upstream, bool), LinkError> {
    let kept_upstream = ctx.take_upstream_session(client_id);
    if request.will.is_none() && !kept_upstream {
        return Ok((Upstream::Unneeded(Box::new(request)), false));
    }
    let opened = Upstream::open_now(ctx, id, request).await;
    let refused = match &opened {
        Ok((_, ack)) => (ack.code != ConnectReturnCode::Success).then_some(ack.code),
        Err(_) => None,
    };
    if kept_upstream && (opened.is_err() || refused.is_some()) {
        // rumqttd still keeps the session: the next connection resumes it.
        ctx.keep_upstream_session(client_id);
    }
    if let Some(code) = refused {
        return Err(LinkRefused(code));
    }
    let (upstream, ack) = opened.map_err(LinkFailed)?;
    Ok((upstream, ack.session_present))
}

/// The client as an IM device: IM topics name their user, so only an identity something
/// vouched for, and that is a uid, may use them (on an open listener, the username is only
/// the client's word).
fn im_device(admitted: &Admitted) -> Option<Device> {
    if !admitted.vouched {
        return None;
    }
    let uid = Uid::parse(&admitted.identity.uid).ok()?;
    Some(Device {
        uid,
        client_id: admitted.client_id.clone(),
    })
}

async fn read_connect(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    listener: &super::Listener,
) -> Result<ConnectPacket, EdgeError> {
    let max_packet = listener.max_packet;
    let frame = timeout(
        listener.connect_timeout,
        read_frame(stream, buf, max_packet),
    )
    .await
    .map_err(|_| EdgeError::Timeout("CONNECT"))??;
    if frame.kind() != kind::CONNECT {
        return Err(EdgeError::Protocol("first packet is not CONNECT"));
    }
    let version = codec::connect_version(&frame)?;
    if listener.version.is_some_and(|only| only != version) {
        refuse(
            stream,
            version,
            ConnectReturnCode::UnsupportedProtocolVersion,
            None,
        )
        .await;
        return Err(EdgeError::Refused(
            "MQTT version not served on this listener",
        ));
    }
    let Packet::Connect(connect, properties, will, will_properties, login) =
        frame.decode(version, max_packet)?
    else {
        return Err(EdgeError::Protocol("first packet is not CONNECT"));
    };
    Ok(ConnectPacket {
        version,
        connect,
        properties,
        will,
        will_properties,
        login,
    })
}

/// Client id, the broker's own auth, the will topic, then the policy's `on_connect`.
async fn admit(
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

/// The CONNECT rumqttd gets for this client, whenever the link opens: the client's
/// session flag, will and MQTT 5 properties (3.1.1 clients have none).
fn link_request(packet: ConnectPacket, client_id: &str) -> LinkRequest {
    let (properties, will_properties) = match packet.version {
        Protocol::V5 => (packet.properties, packet.will_properties),
        Protocol::V4 => (None, None),
    };
    LinkRequest {
        client_id: client_id.to_owned(),
        clean_session: packet.connect.clean_session,
        properties,
        will: packet.will,
        will_properties,
    }
}

async fn refuse(
    stream: &mut ClientStream,
    version: Protocol,
    code: ConnectReturnCode,
    reason: Option<String>,
) {
    let mut out = BytesMut::new();
    let properties = reason.map(|reason| ConnAckProperties {
        // Bounded and clean whatever a script said: it must fit the property's 16-bit length.
        reason_string: Some(crate::text::clean(&reason, crate::im::MAX_MESSAGE)),
        ..Default::default()
    });
    if write_connack(&mut out, version, false, code, properties).is_ok() {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
}

fn write_connack(
    out: &mut BytesMut,
    version: Protocol,
    session_present: bool,
    code: ConnectReturnCode,
    properties: Option<ConnAckProperties>,
) -> Result<(), EdgeError> {
    let (code, properties) = match version {
        Protocol::V4 => (v4_connack_code(code), None),
        Protocol::V5 => (code, properties),
    };
    let ack = ConnAck {
        session_present,
        code,
    };
    codec::write_packet(out, version, Packet::ConnAck(ack, properties))?;
    Ok(())
}

/// The CONNACK code for an authentication refusal.
fn connack_code(refusal: Refusal) -> ConnectReturnCode {
    match refusal {
        Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
        Refusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
        Refusal::Unavailable => ConnectReturnCode::ServerUnavailable,
    }
}

/// rumqttd's 3.1.1 encoder only knows the six 3.1.1 codes.
fn v4_connack_code(code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode as C;
    match code {
        C::Success => C::Success,
        C::BadUserNamePassword => C::BadUserNamePassword,
        C::NotAuthorized | C::Banned => C::NotAuthorized,
        C::ClientIdentifierNotValid => C::ClientIdentifierNotValid,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => C::RefusedProtocolVersion,
        _ => C::ServiceUnavailable,
    }
}
