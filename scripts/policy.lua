-- Validation of every chat message: allowed chat types, a well-formed recipient, non-empty
-- text of bounded length, media with a URL. Settings come from [policy.config.validation].
local settings = config.validation or {}
local max_chars = settings.max_text_chars or 4000
local allowed_types = {}
for _, chat_type in ipairs(settings.chat_types or { "single", "group" }) do
  allowed_types[chat_type] = true
end

local function validate(msg)
  if not allowed_types[msg.chat_type] then
    return false, "chat type not allowed: " .. tostring(msg.chat_type)
  end
  if #msg.to == 0 or #msg.to > 64 or not msg.to:match("^[%w_%-%.@]+$") then
    return false, "malformed recipient"
  end
  if msg.text ~= nil then
    local length = utf8.len(msg.text)
    if length == nil then
      return false, "text is not valid UTF-8"
    end
    if msg.text:match("^%s*$") then
      return false, "empty message"
    end
    if length > max_chars then
      return false, ("text longer than %d characters"):format(max_chars)
    end
  elseif msg.media_url == nil or msg.media_url == "" then
    return false, "media message without a url"
  end
  return nil -- valid: let the next script decide
end

hooks = { on_message = validate }
