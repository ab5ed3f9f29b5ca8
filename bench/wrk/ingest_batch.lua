-- wrk -s bench/wrk/ingest_batch.lua: POST /v1/ingest, a JSON array of BATCH readings
-- (2 metrics each) of DEVICES devices in turn, keep-alive (wrk's default). Each wrk
-- thread numbers its readings from its own id, so (device_id, seq) stays unique.
--
-- GW_RATE (readings per second over all threads; unset or 0: as fast as the
-- server answers) paces the requests: each thread sends its requests on a fixed
-- schedule (request k at start + k x BATCH x threads / GW_RATE, LuaJIT's clock),
-- wrk's delay() holding each connection until its request's slot; a request
-- whose slot has passed (the server answering late) goes at once, so the offered
-- rate is kept as long as a connection is free (give enough connections: at
-- least GW_RATE / BATCH x the answer time).
local BATCH = tonumber(os.getenv("GW_BATCH") or "100")
local DEVICES = tonumber(os.getenv("GW_DEVICES") or "20000")
local RATE = tonumber(os.getenv("GW_RATE") or "0")
local counter = 0
local threads = {}

setup = function(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
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

if RATE > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } gw_timespec;
    int clock_gettime(int clk_id, gw_timespec *tp);
  ]]
  local now = ffi.new("gw_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, now)           -- CLOCK_MONOTONIC
    return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
  end
  local nthreads = tonumber(os.getenv("GW_THREADS") or "1")
  local interval = 1000 * BATCH * nthreads / RATE
  local due = nil

  delay = function()
    local t = now_ms()
    if due == nil then
      due = t
    end
    local slot = due
    due = due + interval
    if slot <= t then
      return 0
    end
    return math.floor(slot - t)
  end
end
