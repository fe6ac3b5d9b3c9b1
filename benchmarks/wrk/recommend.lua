-- POST /recommend for a random known user; BENCH_DELAY_MS > 0 paces each connection (exponential
-- gaps), so that a run holds a target rate instead of saturating the server.
local users = tonumber(os.getenv("BENCH_USERS") or "20000")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
-- BENCH_ROUTE=feedback: POST /feedback (a click of a random user on a random track) instead.
local route = os.getenv("BENCH_ROUTE") or "recommend"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  thread:set("seed", math.random(1, 1000000))
end

function init(args)
  math.randomseed(seed or os.time())
end

function request()
  local u = math.random(1, users)
  if route == "feedback" then
    return wrk.format(nil, "/feedback", nil,
      string.format('{"user_id":"u%06d","track_id":"t%d","event_type":"click"}', u, math.random(1, 10000)))
  end
  return wrk.format(nil, "/recommend", nil, string.format('{"user_id":"u%06d","k":10}', u))
end

if delay_ms > 0 then
  function delay()
    return -math.log(1 - math.random()) * delay_ms
  end
end

function done(summary, latency, requests)
  io.write(string.format("JSON {\"requests\":%d,\"seconds\":%.3f,\"errors\":%d,\"non2xx\":%d,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f}\n",
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000))
end
