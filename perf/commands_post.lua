-- POST /api/scenarios for wrk, run by perf/commands_bench.py: every request is a new
-- command with its own Idempotency-Key ("<run prefix>-<thread>-<n>"), so nothing is
-- ever a replay, and the keys of a run can be found again in the log afterwards.
--
-- Usage: wrk -t1 -c32 -d8s -s perf/commands_post.lua http://127.0.0.1:PORT -- \
--          PREFIX BEARER_KEY BODY_FILE
--
-- done() prints one line "READ_BENCH_RESULT {json}" (the shape perf/wrk.py parses): the
-- totals, wrk's error counts (status: answers with a status of 400 or more) and latency
-- percentiles in microseconds.

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
  table.insert(threads, thread)
end

local prefix
local headers
local body
local sent = 0

function init(args)
  prefix, headers = args[1], {}
  if prefix == nil or args[2] == nil or args[3] == nil then
    error("commands_post.lua needs PREFIX BEARER_KEY BODY_FILE after --")
  end
  headers["Authorization"] = "Bearer " .. args[2]
  headers["Content-Type"] = "application/json"
  local file = assert(io.open(args[3], "rb"))
  body = file:read("*a")
  file:close()
end

function request()
  sent = sent + 1
  headers["Idempotency-Key"] = prefix .. "-" .. thread_id .. "-" .. sent
  return wrk.format("POST", "/api/scenarios", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'READ_BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, '
      .. '"p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean
  ))
end
