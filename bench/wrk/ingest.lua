-- wrk -s bench/wrk/ingest.lua: POST /v1/ingest/{device_id} with a valid record,
-- 1,000 devices in turn, keep-alive (wrk's default).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"seq":%d,"metrics":{"temp_c":%.1f,"rh":%d},"tags":{"site":"AAL"}}',
                             n, 20 + (n % 50) / 10, 40 + n % 20)
  return wrk.format(nil, string.format("/v1/ingest/dev-%05d", n % 1000), nil, body)
end
