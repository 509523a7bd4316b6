//! The CONNECT handshake: decode, admission (`admit`: client id, the listener's own auth,
//! the hooks' `admit`), the client id's take-over, the private MQTT 5 link to rumqttd when
//! the client needs it from the start, and the CONNACK to the client.

use std::sync::Arc;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, LastWillProperties, Packet,
};
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

pub(super) use super::admit::Arrival;
use super::admit::{admit, Admitted, ConnectPacket};
use super::carry::{self, Carried};
use super::cluster::{Cluster, Moved};
use super::codec::{self, kind, read_frame, Protocol, READ_SMALL};
use super::expiry::Lifetime;
use super::limits::DeviceSlot;
use super::links::LinkClaim;
use super::session::{receive_maximum, ClientLimits, Terms};
use super::transport::{ClientStream, Upgraded};
use super::upstream::{upstream_client_id, LinkRequest, Upstream};
use super::{EdgeContext, EdgeError};
use crate::domain::{Device, Uid};

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
    let keep_alive = packet.connect.keep_alive;
    let interval = packet
        .properties
        .as_ref()
        .and_then(|p| p.session_expiry_interval);
    let lifetime = Lifetime::of(version, packet.connect.clean_session, interval);
    let username = packet.login.as_ref().map(|l| l.username.clone());
    let max_packet = packet
        .properties
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .and_then(|size| usize::try_from(size).ok());
    let receive_max = packet.properties.as_ref().and_then(|p| p.receive_maximum);
    let packet_alias_max = packet.properties.as_ref().and_then(|p| p.topic_alias_max);
    let link = ctx.links.claim(&admitted.client_id, id).await?;
    // A session that expired since its connection ended is gone: this one starts anew.
    let expired = ctx
        .expiring
        .expired(&admitted.client_id, Instant::now())
        .is_some();
    let clean_start = packet.connect.clean_session || expired;
    let im = im_device(&admitted);
    let moved = match &ctx.cluster {
        Some(cluster) => {
            let uid = im.as_ref().map(|device| &device.uid);
            let claimed = cluster.claim_client(&admitted.client_id, uid, !clean_start);
            claimed.await
        }
        None => None,
    };
    let request = link_request(packet, &admitted.client_id, clean_start, lifetime);
    let linked = link_at_connect(
        &ctx,
        id,
        request,
        &admitted.client_id,
        clean_start,
        moved.as_ref(),
    );
    let linked = linked.await;
    let (upstream, upstream_session) = match linked {
        Ok(linked) => linked,
        Err(LinkRefused(code)) => {
            refuse(&mut stream, version, code, None).await;
            return Err(EdgeError::Refused("rumqttd refused the connection"));
        }
        Err(LinkFailed(e)) => return Err(e),
    };
    let kept_im = im.as_ref().is_some_and(|device| ctx.has_session(device));
    let session_present = !clean_start && (upstream_session || kept_im || moved.is_some());
    // Outgoing buffers start empty and grow when needed.
    let mut client_out = BytesMut::new();
    let inbound_max = receive_maximum(&arrival.listener);
    let properties = (version == Protocol::V5).then(|| ConnAckProperties {
        assigned_client_identifier: admitted.assigned,
        receive_max: Some(inbound_max),
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
        clean_start,
        lifetime,
        limits: ClientLimits {
            receive_max,
            max_packet,
            topic_alias_max: packet_alias_max,
            inbound_max,
        },
        moved,
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
/// for a session rumqttd keeps (persistent: resumed; clean: discarded), and for a session
/// `moved` here from another node (its subscriptions are made and advertised before the
/// CONNACK) — and returns it with whether rumqttd had a session; otherwise it stays to
/// open on first need.
async fn link_at_connect(
    ctx: &Arc<EdgeContext>,
    id: u64,
    request: LinkRequest,
    client_id: &str,
    clean_start: bool,
    moved: Option<&Moved>,
) -> Result<(Upstream, bool), LinkError> {
    let kept_upstream = ctx.take_upstream_session(client_id);
    if request.will.is_none() && !kept_upstream && moved.is_none() {
        return Ok((Upstream::Unneeded(Box::new(request)), false));
    }
    // A session that starts anew but outlives its connection links without a clean
    // session (rumqttd knows no other way to keep one): what rumqttd kept is dropped first,
    // as it is when the session moved in from another node.
    let stale_kept = moved.is_some() || (clean_start && !request.clean_session);
    if kept_upstream && stale_kept {
        Upstream::discard_session(ctx, id, client_id).await;
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
    let (mut upstream, ack) = opened.map_err(LinkFailed)?;
    if let (Some(moved), Some(cluster)) = (moved, &ctx.cluster) {
        take_subscriptions(ctx, cluster, &mut upstream, moved, client_id)
            .await
            .map_err(LinkFailed)?;
    }
    Ok((upstream, ack.session_present))
}

/// A session moved here: its plain subscriptions are made at this node's rumqttd and their
/// routes advertised, then the node it came from sends what it had queued.
async fn take_subscriptions(
    ctx: &Arc<EdgeContext>,
    cluster: &Cluster,
    upstream: &mut Upstream,
    moved: &Moved,
    client_id: &str,
) -> Result<(), EdgeError> {
    upstream.subscribe_now(ctx, moved.plain.clone()).await?;
    let paths: Vec<String> = moved.plain.iter().map(|f| f.path.clone()).collect();
    if let Some(change) = cluster.subscribed(&paths) {
        cluster.advertise(&change).await;
    }
    cluster.release(moved, client_id).await;
    Ok(())
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

/// The CONNECT rumqttd gets for this client, whenever the link opens: the client's
/// session flag, will and MQTT 5 properties (3.1.1 clients have none).
/// The link for a client: its session resumed unless it starts anew and ends with its
/// connection (rumqttd then keeps none).
fn link_request(
    packet: ConnectPacket,
    client_id: &str,
    clean_start: bool,
    lifetime: Lifetime,
) -> LinkRequest {
    let (mut properties, mut will_properties) = match packet.version {
        Protocol::V5 => (packet.properties, packet.will_properties),
        Protocol::V4 => (None, None),
    };
    if let Some(properties) = &mut properties {
        // The hook layer applies both to what it writes: rumqttd would measure packets
        // with the carried property in them, and alias by filter rather than by topic.
        properties.max_packet_size = None;
        properties.topic_alias_max = None;
    }
    if let Some(will) = &packet.will {
        let carried = Carried::new(will.qos as u8, will.retain, carry::publisher(client_id));
        let properties = will_properties.get_or_insert_with(|| LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
        carry::attach_to_will(&mut properties.correlation_data, &carried);
    }
    LinkRequest {
        client_id: upstream_client_id(client_id),
        clean_session: clean_start && !lifetime.persists(),
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
