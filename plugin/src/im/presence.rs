//! Which devices are online on this node: a device is online while a connection of it holds
//! a subscription covering its inbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::sink::DeviceSink;
use crate::domain::{Device, Uid};

#[derive(Debug)]
struct OnlineDevice {
    client_id: String,
    connection: u64,
    sink: Arc<dyn DeviceSink>,
}

/// The online devices of every user on this node.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    users: Mutex<HashMap<Uid, Vec<OnlineDevice>>>,
}

impl Presence {
    /// Marks a device online through `connection`; a newer connection of the same device
    /// (session take-over) replaces the older one.
    pub(crate) fn online(&self, device: &Device, connection: u64, sink: Arc<dyn DeviceSink>) {
        let Ok(mut users) = self.users.lock() else {
            return;
        };
        let devices = users.entry(device.uid.clone()).or_default();
        devices.retain(|d| d.client_id != device.client_id);
        devices.push(OnlineDevice {
            client_id: device.client_id.clone(),
            connection,
            sink,
        });
    }

    /// Marks a device offline, unless a newer connection already took it over; `true` if
    /// the device is now offline on this node.
    pub(crate) fn offline(&self, device: &Device, connection: u64) -> bool {
        let Ok(mut users) = self.users.lock() else {
            return false;
        };
        let Some(devices) = users.get_mut(&device.uid) else {
            return false;
        };
        devices.retain(|d| !(d.client_id == device.client_id && d.connection == connection));
        let gone = !devices.iter().any(|d| d.client_id == device.client_id);
        if devices.is_empty() {
            users.remove(&device.uid);
        }
        gone
    }

    /// Every online device on this node: (uid, client id).
    pub(crate) fn all(&self) -> Vec<Device> {
        self.users
            .lock()
            .map(|users| {
                users
                    .iter()
                    .flat_map(|(uid, devices)| {
                        devices.iter().map(|d| Device {
                            uid: uid.clone(),
                            client_id: d.client_id.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The connections of a user's online devices.
    pub(crate) fn sinks(&self, uid: &str) -> Vec<Arc<dyn DeviceSink>> {
        self.users
            .lock()
            .map(|users| {
                users
                    .get(uid)
                    .map(|devices| devices.iter().map(|d| Arc::clone(&d.sink)).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// The connections of one device (normally one).
    pub(crate) fn device_sinks(&self, device: &Device) -> Vec<Arc<dyn DeviceSink>> {
        self.users
            .lock()
            .map(|users| {
                users
                    .get(&device.uid)
                    .into_iter()
                    .flatten()
                    .filter(|d| d.client_id == device.client_id)
                    .map(|d| Arc::clone(&d.sink))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Users and devices online on this node.
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.users
            .lock()
            .map(|users| (users.len(), users.values().map(Vec::len).sum()))
            .unwrap_or_default()
    }

    /// Client ids of a user's online devices.
    pub(crate) fn devices(&self, uid: &str) -> Vec<String> {
        self.users
            .lock()
            .map(|users| {
                users
                    .get(uid)
                    .map(|devices| devices.iter().map(|d| d.client_id.clone()).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::*;
    use crate::im::sink::DeviceEvent;

    #[derive(Debug)]
    struct Nowhere;
    impl DeviceSink for Nowhere {
        fn push(&self, _: DeviceEvent) -> bool {
            true
        }
    }

    #[test]
    fn takeover_survives_the_old_connection_closing() {
        let presence = Presence::default();
        let phone = Device {
            uid: uid("a"),
            client_id: "phone".into(),
        };
        presence.online(&phone, 1, Arc::new(Nowhere));
        presence.online(&phone, 2, Arc::new(Nowhere));
        presence.offline(&phone, 1);
        assert_eq!(presence.devices("a"), vec!["phone".to_string()]);
        presence.offline(&phone, 2);
        assert!(presence.devices("a").is_empty());
    }
}
