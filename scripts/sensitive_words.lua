-- Sensitive words: a message with a word of the `blocked` list is denied; words of the
-- `default` list are masked. Both lists are files named in [policy.words].
local mask_char = config.mask_char or "*"
local has_blocked = words.has("blocked")
local has_default = words.has("default")

local function filter(msg)
  if msg.text == nil then
    return nil
  end
  if has_blocked then
    -- mask's count says as much as find would, without building a table of the words
    local _, found = words.mask(msg.text, mask_char, "blocked")
    if found > 0 then
      return false, "message contains a blocked word"
    end
  end
  if has_default then
    local masked, count = words.mask(msg.text, mask_char)
    if count > 0 then
      log.info(("masked %d word(s) in a message from %s"):format(count, msg.from))
      return { text = masked }
    end
  end
  return nil
end

hooks = { on_message = filter }
