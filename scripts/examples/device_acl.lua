-- Example: topic ACLs for a team's devices and an extra connect check.
-- Devices (uids starting with "dev-") may only subscribe under "devices/{uid}/".
local function on_subscribe(sub)
  if sub.uid:sub(1, 4) == "dev-" then
    local own = "devices/" .. sub.uid .. "/"
    if sub.filter:sub(1, #own) ~= own then
      return false, "devices may only subscribe to their own topics"
    end
  end
  return nil
end

-- Refuse MQTT 3.1.1 clients with keep-alive 0 that ask for a persistent session.
local function on_connect(client)
  if client.protocol == "3.1.1" and client.keep_alive == 0 and not client.clean_session then
    return false, "persistent sessions need a keep-alive"
  end
  return nil
end

hooks = { on_subscribe = on_subscribe, on_connect = on_connect }
