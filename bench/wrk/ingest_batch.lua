-- wrk -s bench/wrk/ingest_batch.lua: POST /v1/ingest, a JSON array of BATCH readings
-- (2 metrics each) of DEVICES devices in turn, keep-alive (wrk's default). Each wrk
-- thread numbers its readings from its own id, so (device_id, seq) stays unique.
local BATCH = tonumber(os.getenv("GW_BATCH") or "100")
local DEVICES = tonumber(os.getenv("GW_DEVICES") or "20000")
local counter = 0
local threads = {}

setup = function(thread)
  thread:set("id", counter)
  counter = counter + 1
end

init = function(args)
  n = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.path = "/v1/ingest"
end

request = function()
  local parts = {}
  for i = 1, BATCH do
    n = n + 1
    local d = (n * 7919 + id) % DEVICES
    parts[i] = string.format('{"device_id":"dev-%05d","seq":%d,"metrics":{"temp_c":%.1f,"humidity_pct":%d},"tags":{"site":"AAL"}}',
                             d, id * 1000000000 + n, 20 + (n % 50) / 10, 40 + n % 20)
  end
  return wrk.format(nil, nil, nil, "[" .. table.concat(parts, ",") .. "]")
end
