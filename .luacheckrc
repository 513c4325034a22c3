-- The store's Lua scripts (invoice_worker/lua): Redis runs Lua 5.1 with these globals.
std = "lua51"
max_line_length = 100
read_globals = { "redis", "KEYS", "ARGV", "unpack", "cjson" }
files["invoice_worker/lua/*.lua"] = {
  -- Defined by the header the store prepends (from constants.py) and by _lib.lua.
  read_globals = {
    "FINAL", "JOB_KEY", "COPY_KEY", "ATTEMPT_FIELDS", "EVENT_FIELDS", "JOB_EVENT", "INVOICE_RANK",
    "CONF",
    "now_ms", "move", "tail", "field_list", "replayed", "remember",
  },
}
files["invoice_worker/lua/_lib.lua"] = { read_globals = { "FINAL" } }
