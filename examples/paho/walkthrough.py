"""Walk-through with paho-mqtt against a running mqtt-im (see README).

pip install paho-mqtt protobuf grpcio-tools
python3 examples/paho/walkthrough.py   (address from MQTT_IM_ADDR, default 127.0.0.1:11883)

The wire types are generated from proto/ next to this file on first run.
"""
import os
import queue
import sys
import time

import paho.mqtt.client as mqtt

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "..", "..", "proto")
if not os.path.exists(os.path.join(HERE, "mqtt_im", "v1", "im_pb2.py")):
    from grpc_tools import protoc

    protoc.main(["protoc", f"-I{PROTO}", f"--python_out={HERE}", "mqtt_im/v1/im.proto"])
sys.path.insert(0, HERE)
from mqtt_im.v1 import im_pb2 as pb  # noqa: E402

HOST, PORT = os.environ.get("MQTT_IM_ADDR", "127.0.0.1:11883").rsplit(":", 1)


def connect(client_id, user, password):
    inbox = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(user, password)
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    client.connect(HOST, int(PORT))
    # loop_start also reconnects: when the server cannot store a publish (its database is
    # down), an MQTT 3.1.1 client gets an error on `resp` and the connection is closed;
    # paho reconnects and retransmits what was not acknowledged. Nothing else to do here.
    client.loop_start()
    return client, inbox


def next_on(inbox, topic):
    while True:
        got, payload = inbox.get(timeout=10)
        if got == topic:
            return payload


def main():
    run = str(int(time.time()))
    alice, _ = connect("alice-paho", "alice", "alice-pw")
    for i in range(1, 4):
        env = pb.Envelope(cmd=pb.CMD_CHAT)
        env.chat.msg_id = f"{run}-py-{i}"
        env.chat.to = "bob"
        env.chat.msg.text = f"hello bob #{i} (python)"
        alice.publish("im/u/bob", env.SerializeToString(), qos=1).wait_for_publish()
    print("alice: 3 messages stored (PUBACKed)")

    bob, inbox = connect("bob-paho", "bob", "bob-pw")
    bob.subscribe("im/u/bob/#", qos=1)
    digest = pb.Digest.FromString(next_on(inbox, "im/u/bob/digest"))
    for name, session in digest.sessions.items():
        print(f"bob: digest v{digest.version}: {name}: {session.count} new")
    req = pb.Request(request_id="clear")
    req.clear_counters.version = digest.version
    bob.publish("im/u/bob/req", req.SerializeToString(), qos=1)
    next_on(inbox, "im/u/bob/resp")

    ack = None
    while True:
        req = pb.Request(request_id="pull")
        req.pull.conversation = "u/alice"
        req.pull.page_size = 2
        if ack is not None:
            req.pull.ack.CopyFrom(ack)
        bob.publish("im/u/bob/req", req.SerializeToString(), qos=1)
        page = pb.Response.FromString(next_on(inbox, "im/u/bob/resp")).page
        for message in page.messages:
            sender = getattr(message, "from")  # `from` is a Python keyword
            print(f"bob: seq {message.seq} from {sender}: {message.msg.text}")
        if not page.messages and page.end:
            print("bob: end of backlog")
            break
        ack = page.cursor
    alice.disconnect()
    bob.disconnect()


if __name__ == "__main__":
    main()
