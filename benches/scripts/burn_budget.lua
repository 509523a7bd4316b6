-- A heavy policy script for the load harness: every chat message burns about 95% of the
-- default instruction budget (1,000,000) and then lets the message through.
local rounds = 475000

hooks = {
  on_message = function()
    local x = 0
    for i = 1, rounds do
      x = x + i
    end
    return nil
  end,
}
