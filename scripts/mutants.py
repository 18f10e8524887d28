"""Our own mutation check: does the suite notice when a critical behaviour breaks?

Each mutation is one deliberate bug: (file, exact old text, new text, the tests that must catch it). For each
one the script copies the repository (tracked and untracked-but-not-ignored files) into a temporary folder,
applies that single edit, runs only the mapped tests there with this same Python (the project's venv, with
the copy first on PYTHONPATH so Ray workers import the mutated code too) and reports:

  caught   the mapped tests failed (what we want)
  MISSED   they all passed: the suite would not notice this bug
  stale    the old text is not in the file (code moved or changed: update the entry), or a mapped test is gone
  error    pytest could not run them (see the output tail), or they ran past --timeout

Run it before a change lands, not in CI (the slow mappings start Ray clusters and train). Examples:

  python scripts/mutants.py --list
  python scripts/mutants.py --only objective-sign --only lora-weight
  python scripts/mutants.py --fast            # only the mutations whose tests are unit tests (minutes)
  python scripts/mutants.py | tee bench/results/mutants-$(date +%F).txt

`--clean` runs the mapped tests of the selected mutations WITHOUT the mutation (they must pass, or a "caught"
means nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "out", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules"}


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the behaviour that breaks, in words
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root
    slow: bool = False  # starts Ray / trains / serves: minutes, not seconds


M = Mutation
MUTATIONS: list[Mutation] = [
    # -- the training objective ----------------------------------------------------------------------------
    M("objective-sign", "flow-matching target flipped (x0 - noise instead of noise - x0)",
      "train/loop.py", "target, _ = pack_latents(noise - x0)", "target, _ = pack_latents(x0 - noise)",
      ("tests/test_train_units.py::test_flow_matching_target_is_noise_minus_x0",)),
    # -- training you can watch (train/live.py) --------------------------------------------------------------
    M("samples-after-training", "the driver renders only the base columns while training; checkpoints wait for the end",
      "train/live.py", "for family, steps in self.planned.items() for step in (None, *steps)),",
      "for family, steps in self.planned.items() for step in (None,)),",
      ("tests/test_train_job.py::test_resubmitting_a_job_after_its_driver_died_resumes_it",), slow=True),
    M("no-step-scalars", "the worker logs only the checkpoints' validation loss to TensorBoard, not every step",
      "train/worker.py", "            events.scalars(step, scalars)\n", "            pass\n",
      ("tests/test_train_job.py::test_the_job_logs_every_step_and_its_samples_for_tensorboard",), slow=True),
    M("ray-report-every-n", "the workers call ray.train.report only at checkpoints, not every log_every steps",
      "train/worker.py", "            ray.train.report(metrics)\n", "            pass\n",
      ("tests/test_train_job.py::test_ray_train_reports_the_step_metrics_every_log_every_steps",), slow=True),
    M("mlflow-reports", "Ray Train's reports never reach the MLflow run (the controller's callback logs nothing)",
      "train/live.py", "self._client.log_batch(self.run_id, metrics=batch)", "self._client.log_batch(self.run_id, metrics=[])",
      ("tests/test_train_job.py::test_report_to_mlflow_logs_the_run_through_ray_train_and_the_driver",), slow=True),
    M("sheet-failure-fails-job", "a contact sheet that fails after delivery fails the job",
      "train/job.py", '        log.warning("job %s: no contact sheet: %s", cfg.job_id, failure_reason(e))\n', "        raise\n",
      ("tests/test_train_job.py::test_a_contact_sheet_that_fails_after_delivery_leaves_the_job_delivered",), slow=True),
    M("sheet-log-left-open", "the driver's log is closed only by a contact sheet that succeeds",
      "train/job.py", "            samples.close(delivered)\n", "            pass\n",
      ("tests/test_train_job.py::test_a_contact_sheet_that_fails_after_delivery_leaves_the_job_delivered",), slow=True),
    # (was column-failure-spreads: "a failed column raises at once, leaving the other failed ones for a later collect".
    # Since a job's last columns render one at a time, no other column is in flight when one fails: an equivalent mutant
    # but for a race, missed on 2026-12-02. Re-defined on what a failed column must still do: fail the sheet with its reason.)
    M("column-failure-reason", "a failed column is only logged: the sheet then fails on a missing file, not with the render's reason",
      "train/live.py", "            self.submit(*key)\n            self.collect(wait_for=[key])\n",
      "            self.submit(*key)\n            self._wait_for_pending()\n            self.collect()\n",
      ("tests/test_train_job.py::test_a_contact_sheet_that_fails_after_delivery_leaves_the_job_delivered",), slow=True),
    # -- LoRA names that travel ------------------------------------------------------------------------------
    M("named-lora-file", "the LoRA is not written under the job's name (only lora.safetensors)",
      "train/job.py", "        named: lora_bytes,  # the same LoRA under the job's name", "        # named: lora_bytes,",
      ("tests/test_train_job.py::test_the_lora_is_delivered_under_the_jobs_name_beside_its_old_name",), slow=True),
    M("named-lora-download", "the download route does not offer the LoRA under the job's name",
      "serve/jobs.py", "candidates = {**PUBLIC_FILES, comfy: comfy, **({named: named} if named else {})}",
      "candidates = {**PUBLIC_FILES, comfy: comfy}",
      ("tests/test_lora_files.py::test_public_files_list_the_lora_under_its_name_beside_the_old_name",)),
    M("objective-sign-e2e", "flipped target, judged only by what training draws (no unit test)",
      "train/loop.py", "target, _ = pack_latents(noise - x0)", "target, _ = pack_latents(x0 - noise)",
      ("tests/test_train_job.py::test_training_moves_generated_images_toward_the_refs",), slow=True),
    M("noisy-interpolation", "noisy latents interpolate the wrong way round (σ weights x0)",
      "train/loop.py", "noisy = (1 - s) * x0 + s * noise", "noisy = s * x0 + (1 - s) * noise",
      ("tests/test_train_units.py::test_flow_matching_target_is_noise_minus_x0",)),
    M("timestep-scaling", "the transformer gets σ·1000 as its timestep (it scales by 1000 itself)",
      "train/loop.py", "timestep=sigmas.to(device=device, dtype=dtype),",
      "timestep=sigmas.to(device=device, dtype=dtype) * 1000,",
      ("tests/test_train_units.py::test_flow_matching_target_is_noise_minus_x0",)),
    M("sigma-shift", "timesteps not shifted towards noise for larger images",
      "train/loop.py", "return math.exp(mu) / (math.exp(mu) + (1 / t.clamp(1e-5, 1 - 1e-5) - 1))", "return t",
      ("tests/test_train_units.py::test_shift_grows_with_resolution",)),
    M("caption-dropout", "caption dropout keeps the caption when it should drop it (and the reverse)",
      "train/loop.py", "(torch.rand(len(idx), generator=gen) < caption_dropout_rate)",
      "(torch.rand(len(idx), generator=gen) > caption_dropout_rate)",
      ("tests/test_train_units.py::test_caption_dropout_replaces_the_whole_caption",)),
    # -- resume --------------------------------------------------------------------------------------------
    M("resume-optimizer", "a resumed run starts with a fresh optimizer state",
      "train/loop.py", "        optimizer.load_state_dict(blob[\"optimizer\"])\n", "        pass\n",
      ("tests/test_train_units.py::test_checkpoint_round_trip_restores_lora_optimizer_and_schedule",)),
    M("resume-attempt", "a resumed run does not count its attempt",
      "train/loop.py", "attempt=meta.get(\"attempt\", 0) + 1)", "attempt=meta.get(\"attempt\", 0))",
      ("tests/test_train_units.py::test_checkpoint_round_trip_restores_lora_optimizer_and_schedule",)),
    M("resume-step", "a resumed worker trains again from step 1",
      "train/worker.py", "first_step = state.step + 1", "first_step = 1",
      ("tests/test_train_job.py::test_a_killed_worker_resumes_exactly",), slow=True),
    # -- serving: tenants, weights, integrity ----------------------------------------------------------------
    M("tenant-check", "any tenant may use any LoRA id",
      "serve/routers/common.py", "if not jobstore.owns(ctx().storage, tenant, lora_id):", "if False:",
      ("tests/test_serve_http.py::test_tenant_isolation_on_every_endpoint",), slow=True),
    M("lora-weight", "a single LoRA is applied at weight 1.0 whatever the user asked",
      "serve/routers/generate.py", "return adapter_set_id(loras), [loras[0][\"weight\"]], None, {\"method\": \"single\"}",
      "return adapter_set_id(loras), [1.0], None, {\"method\": \"single\"}",
      ("tests/test_serve_http.py::test_a_single_lora_at_weight_half_draws_what_the_pipeline_draws_at_half",),
      slow=True),
    M("integrity-generator", "the generator loads a stored LoRA without checking its sha256",
      "serve/generator.py", "read_lora(self.storage.read_verified(f[\"key\"], f[\"sha256\"]), name=f[\"key\"])",
      "read_lora(self.storage.read_bytes(f[\"key\"]), name=f[\"key\"])",
      ("tests/test_serve_http.py::test_a_tampered_stored_lora_is_refused_by_generate_fusion_and_download",),
      slow=True),
    M("integrity-fusion", "the fusion stage reads LoRAs without checking their sha256",
      "serve/fusion.py", "read_lora(self.storage.read_verified(s[\"key\"], s[\"sha256\"]), name=s.get(\"id\"))",
      "read_lora(self.storage.read_bytes(s[\"key\"]), name=s.get(\"id\"))",
      ("tests/test_serve_fusion.py::test_fusion_service_caches_and_verifies",)),
    M("integrity-download", "the file download serves stored bytes without checking their sha256",
      "serve/routers/loras.py", "data = await asyncio.to_thread(storage.read_verified, f\"{lora_prefix(tenant, lora_id)}/{path}\",",
      "data = await asyncio.to_thread(lambda k, _sha: storage.read_bytes(k), f\"{lora_prefix(tenant, lora_id)}/{path}\",",
      ("tests/test_serve_http.py::test_a_tampered_stored_lora_is_refused_by_generate_fusion_and_download",),
      slow=True),
    M("integrity-storage", "Storage.read_verified accepts bytes whose sha256 differs",
      "cluster/storage.py", "        actual = sha256_bytes(data)\n        if actual != expected_sha256:",
      "        actual = sha256_bytes(data)\n        if False:",
      ("tests/test_storage.py",)),
    M("atomic-write", "storage writes straight to the final name (a crash leaves half a file there)",
      "cluster/storage.py",
      "tmp = posixpath.join(parent, f\"{_TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(target)}\")",
      "tmp = target",
      ("tests/test_storage.py",)),
    M("pickle-refusal", "a file that is not safetensors gets past the header check",
      "klein/lora.py", "if header_len <= 0 or header_len > len(data) - 8 or data[8:9] != b\"{\":", "if False:",
      ("tests/test_lora.py::test_not_safetensors_is_refused_without_unpickling",)),
    # -- captions and triggers -----------------------------------------------------------------------------
    M("caption-lint-case", "the style-word lint is case-sensitive ('Watercolor' passes)",
      "gemini/style_words.py", "token = match.group(0).lower()", "token = match.group(0)",
      ("tests/test_quality_guards.py",)),
    M("trigger-placement", "the trigger goes after the caption instead of before it",
      "contracts.py", "return f\"{trigger}. {text}\"", "return f\"{text}. {trigger}\"",
      ("tests/test_dataset.py::test_with_trigger",)),
    M("common-trigger-case", "a common word in capitals ('STYLE') is accepted as a trigger",
      "train/captions.py", "if trigger.lower() in COMMON_TRIGGER_WORDS:", "if trigger in COMMON_TRIGGER_WORDS:",
      ("tests/test_dataset.py::test_common_words_are_refused_with_a_suggestion",)),
    # -- K-LoRA --------------------------------------------------------------------------------------------
    M("klora-k", "K-LoRA's k is the sum of the ranks, not their product",
      "klein/fusion.py", "return math.prod(l.layers[name].rank for l in loras if name in l.layers)",
      "return sum(l.layers[name].rank for l in loras if name in l.layers)",
      ("tests/test_serve_fusion.py::test_klora_scores_use_k_as_the_product_of_ranks",)),
    M("klora-choice", "K-LoRA picks the LoRA with the SMALLER scaled score at a layer",
      "klein/fusion.py", "        if value > weighted[best]:", "        if value < weighted[best]:",
      ("tests/test_serve_fusion.py",)),
    M("klora-topk-abs", "K-LoRA's score sums the largest signed entries, not the largest magnitudes",
      "klein/fusion.py", "value = float(torch.topk(delta.abs().flatten(), k).values.sum())",
      "value = float(torch.topk(delta.flatten(), k).values.sum())",
      ("tests/test_serve_fusion.py::test_topk_abs_sum_matches_brute_force",)),
    M("accel-ignored", "the Generator deployment drops the configured accel mode",
      "serve/generator.py", "                                   accel=self.config.accel)",
      "                                   accel=\"off\")",
      ("tests/test_serve_config.py::test_accel_is_validated_and_reaches_the_generator",)),
    M("probe-noop", "the health probe reports healthy without running the pipeline",
      "serve/generator.py", "        if not self.lock.acquire(blocking=False):\n            return  # busy generating",
      "        if True:\n            return  # busy generating",
      ("tests/test_serve_generator.py::test_fused_generator_probe",)),
    # -- limits and deadlines ------------------------------------------------------------------------------
    M("rate-limit", "the token bucket is full again at every request",
      "serve/tenants.py", "bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)",
      "bucket.tokens = burst",
      ("tests/test_serve_tenants.py::test_token_bucket_allows_bursts_then_says_when_to_retry",)),
    M("auth-guesses-unlimited", "an address out of authentication attempts still has its keys looked at",
      "serve/middleware.py", "        wait = failures.peek(client)\n        if wait > 0:", "        wait = failures.peek(client)\n        if False:",
      ("tests/test_serve_http.py::test_failed_authentication_is_rate_limited_per_client",), slow=True),
    M("auth-limit-global", "one failed-authentication budget for every client address",
      "serve/middleware.py", "    return request.client.host if request.client else \"unknown\"", "    return \"unknown\"",
      ("tests/test_serve_http.py::test_failed_authentication_is_rate_limited_per_client",), slow=True),
    M("body-idle-ignored", "a stalled request body is cut off only at the overall body deadline",
      "serve/middleware.py", "message = await asyncio.wait_for(receive(), min(left, limits.body_idle_s))",
      "message = await asyncio.wait_for(receive(), left)",
      ("tests/test_serve_middleware.py::test_a_stalled_body_gets_408_at_the_idle_deadline",)),
    M("queue-lease-never-expires", "a queued job whose driver went silent keeps its place for ever",
      "cluster/pools.py", "alive = [w for w in self._waiting if now - w.last_seen <= self._lease_s]",
      "alive = list(self._waiting)",
      ("tests/test_pools.py::test_queue_drops_a_job_whose_driver_went_silent",), slow=True),
    M("train-queue-imports-torch", "the training queue's actor module imports torch (every cluster pays ~2.7 CPU-s)",
      "cluster/train_queue.py", "import ray\n", "import ray\nimport torch  # noqa: F401\n",
      ("tests/test_pools.py::test_queue_is_first_come_first_served",)),
    M("gemini-concurrency-plus-one", "one more Gemini request in flight than max_concurrency",
      "gemini/client.py", "self._semaphore = threading.BoundedSemaphore(self.config.max_concurrency)",
      "self._semaphore = threading.BoundedSemaphore(self.config.max_concurrency + 1)",
      ("tests/test_gemini_client.py::test_concurrency_limit",)),
    M("l2-reask-own-deadline", "the L2 re-ask gets a deadline of its own (the request waits twice as long)",
      "gemini/rewrite.py", "                deadline_at=deadline_at,\n",
      "                deadline_at=time.monotonic() + client.config.deadline_for(\"rewrite\"),\n",
      ("tests/test_gemini_hardening.py::test_the_l2_reask_shares_one_deadline",)),
    M("upstream-deadline", "the ingress waits on a downstream deployment with no deadline",
      "serve/routers/common.py", "return await asyncio.wait_for(wait(response), remaining)", "return await wait(response)",
      ("tests/test_reliability_serve.py::test_a_request_deadline_answers_503_not_a_hang",), slow=True),
    # each request carries its own read timeout (the configured one, or what is left of the call's deadline); the SDK
    # client's own timeout is only a fallback under it, so removing that one alone changes nothing (an equivalent mutant)
    M("gemini-timeout", "a Gemini request waits 10 minutes for an answer instead of its configured timeout",
      "gemini/client.py", "http_options=types.HttpOptions(timeout=max(1, int(min(self.config.timeout_s, timeout_s) * 1000))),",
      "http_options=types.HttpOptions(timeout=600_000),",
      ("tests/test_gemini_client.py::test_timeout_is_per_call_and_retried",)),
    M("prompt-cache-ignores-text-length", "a prompt's kept embedding is reused at another text length",
      "klein/generate.py", "key = (prompt, int(max_sequence_length), str(device))", "key = (prompt, str(device))",
      ("tests/test_model.py::test_each_prompt_is_encoded_once_per_pipeline_and_text_length",)),
    M("negative-encoded-per-image", "the empty negative prompt is encoded again for every image of a batch",
      "klein/generate.py", "negative_prompt_embeds=encoded_prompts(pipe, [negative] * len(chunk), device, msl) if cfg else None,",
      "negative_prompt_embeds=None,",
      ("tests/test_model.py::test_each_prompt_is_encoded_once_per_pipeline_and_text_length",)),
    M("denoise-negative-encoded-per-request", "our own denoising loop (the accelerated serving path) encodes the "
      "negative prompt again for every request", "klein/generate.py",
      "neg_embeds = encoded_prompts(pipe, [request.negative_prompt or \"\"], device, msl)",
      "neg_embeds = pipe.encode_prompt(prompt=request.negative_prompt or \"\", device=device, max_sequence_length=msl)[0]",
      ("tests/test_accel.py::test_our_loop_unbatched_is_the_pipeline_call",)),
    # -- LoRA maths ----------------------------------------------------------------------------------------
    M("lora-scale", "a LoRA layer's alpha/rank scale is dropped",
      "klein/lora.py", "        return self.alpha / self.rank", "        return 1.0",
      ("tests/test_serve_fusion.py::test_linear_merge_equals_the_dense_weighted_sum", "tests/test_lora.py")),
    M("ddp-no-allreduce", "DDP workers train without averaging their gradients (each on its own batches)",
      "train/step.py", "            model = ray.train.torch.prepare_model(transformer, move_to_device=False,\n"
      "                                                  parallel_strategy_kwargs={\"find_unused_parameters\": False})",
      "            model = transformer",
      ("tests/test_train_scaleout.py::test_two_workers_train_data_parallel_exactly",), slow=True),
    # -- issue 21: ai-toolkit configs, ComfyUI file names, stopped jobs, Ray Train's storage, /healthz ----------
    M("aitoolkit-silent-keys", "an ai-toolkit key we cannot train is ignored instead of refused by name",
      "train/aitoolkit.py", "            raise ConfigError(f\"{where} is not supported: {hint}\")", "            pass",
      ("tests/test_aitoolkit_config.py::test_unsupported_ai_toolkit_keys_are_refused_by_name",)),
    M("comfyui-fixed-name", "every job's ComfyUI export has the same name (they overwrite each other in ComfyUI)",
      "contracts.py", "    return f\"{stem}.safetensors\"", "    return \"lora_comfyui.safetensors\"",
      ("tests/test_lora_files.py",)),
    M("stop-signal-ignored", "a signalled driver leaves its jobs at \"training\"",
      "train/status.py", "        mark_running_jobs_stopped(f\"the driver received", "        0 and mark_running_jobs_stopped(f\"the driver received",
      ("tests/test_job_stop.py",)),
    M("ray-storage-default-fs", "Ray Train builds its own filesystem from the URI (an s3:// run goes to AWS, not MinIO)",
      "train/job.py", "        storage_filesystem=storage.fs,\n", "",
      ("tests/test_storage.py::test_ray_trains_run_goes_through_our_filesystem",)),
    M("healthz-always-ok", "/healthz answers 200 while the Generator is still starting",
      "serve/routers/service.py", "    if ready is False:", "    if False:",
      ("tests/test_serve_health.py",)),
    # -- issue 22: the health report -------------------------------------------------------------------------
    M("health-fry-blind", "a deep-fried LoRA (lr x 50) is not called fried",
      "train/health.py", "    return m[\"fry\"] >= FRY_FAIL or m[\"shape_contrast\"] <= SHAPE_FAIL",
      "    return False", ("tests/test_health.py::test_lr_x50_is_deep_fried",)),
    M("health-seed-spread-blind", "a LoRA that draws one picture whatever the seed is not flagged",
      "train/health.py", "    return float(np.mean([mean_pairwise(g) for g in groups]))", "    return 1.0",
      ("tests/test_health.py::test_steps_x10_draws_one_picture_whatever_the_seed_and_an_earlier_checkpoint_is_recommended",)),
    M("health-refs-detail-blind", "refs blown up from 40 px count as sharp",
      "train/health.py", "        if float(np.abs(back - pixels).mean()) > DETAIL_ERROR:", "        if True:",
      ("tests/test_health.py::test_the_refs_and_captions_of_each_case_say_what_is_wrong_with_them",)),
    M("oom-generic-reason", "an out-of-memory job fails without the fix for its settings",
      "train/job.py", "        if is_out_of_memory(reason):", "        if False:",
      ("tests/test_train_job.py::test_an_out_of_memory_job_fails_with_the_seeds_fix_for_its_settings",), slow=True),
    # -- issue 21: the HTTP contract and its client ----------------------------------------------------------
    M("error-body-renamed", "errors answer {error, detail, param}: the wire no longer matches the documented ErrorBody",
      "serve/errors.py", '"field": field, **extra}', '"param": field, **extra}',
      ("tests/test_serve_http.py::test_the_typed_clients_reach_every_endpoint_and_every_answer_matches_the_openapi_document",),
      slow=True),
    M("openapi-404-undocumented", "GET /v1/loras/{id} answers 404 but its OpenAPI operation no longer says so",
      "serve/routers/loras.py", '@router.get("/loras/{lora_id}", response_model=LoraStatus, responses=errors(404))',
      '@router.get("/loras/{lora_id}", response_model=LoraStatus)',
      ("tests/test_serve_http.py::test_the_typed_clients_reach_every_endpoint_and_every_answer_matches_the_openapi_document",),
      slow=True),
    M("client-ignores-retry-after", "the client waits its own backoff instead of the service's Retry-After",
      "klein_style_client/client.py",
      "return error.retry_after if error.retry_after is not None else self.backoff_s * 2 ** attempt",
      "return self.backoff_s * 2 ** attempt",
      ("tests/test_client.py::test_429_and_503_are_retried_after_their_retry_after",)),
    M("client-deadline-extended", "a retry's wait may run past the call's deadline",
      "klein_style_client/client.py",
      "if wait is None or time.monotonic() + wait >= deadline:  # retries never extend the deadline",
      "if wait is None:", ("tests/test_client.py::test_retries_never_extend_the_deadline",)),
    # -- issue 23: the suite's speed (what made it faster must stay) ---------------------------------------
    M("local-node-ends-warm-workers", "a local node keeps Ray's default soft limit: the render worker is ended between columns",
      "cluster/pools.py", "system_config.setdefault(\"num_workers_soft_limit\", max(num_cpus, LOCAL_WORKERS_SOFT_LIMIT))",
      "pass", ("tests/test_pools.py::test_a_local_node_keeps_its_warm_worker_and_runs_no_preemption_watcher",), slow=True),
    # -- a local Ray node that did not start (seen once in a full run: the raylet never came up) ---------------
    M("local-ray-no-second-start", "a local node that did not start in Ray's 30 s fails at once instead of starting again",
      "cluster/pools.py", "                if not any(timeout in str(error) for timeout in RAY_NODE_STARTUP_TIMEOUTS):",
      "                if True:",
      ("tests/test_pools.py::test_a_local_node_that_did_not_start_is_ended_and_started_again",), slow=True),
    M("local-ray-gcs-timeout-not-retried", "a local node whose GCS never wrote its port file is not started again",
      "cluster/pools.py", '"Timed out waiting for file")', '"(the GCS port-file timeout, dropped)")',
      ("tests/test_pools.py::test_a_local_node_that_did_not_start_is_ended_and_started_again",), slow=True),
    M("local-ray-half-node-left", "the processes of a local node that did not start are left running",
      "cluster/pools.py", "            process.kill()\n", "            pass\n",
      ("tests/test_pools.py::test_a_local_node_that_did_not_start_is_ended_and_started_again",), slow=True),
    M("cli-imports-every-command", "the command line imports every command's module (submit loads torch and Ray Train)",
      "cli/main.py", "modules = [COMMAND_MODULES[command]] if command else list(dict.fromkeys(COMMAND_MODULES.values()))",
      "modules = list(dict.fromkeys(COMMAND_MODULES.values()))",
      ("tests/test_submit.py::test_submit_imports_only_its_own_command",)),
    M("ingress-imports-the-trainer", "the Ingress replica imports train.job (torch, diffusers, peft, Ray Train) again",
      "serve/jobs.py", "from train.errors import check_job_id\n", "from train.errors import check_job_id\nimport train.job  # noqa: F401\n",
      ("tests/test_reliability_serve.py::test_the_ingress_replicas_never_load_torch",), slow=True),
    M("import-skips-the-fit-check", "an uploaded LoRA is stored without checking that its layers fit the served blocks",
      "serve/fusion.py", "        check_lora_fits(lora, model_skeleton(model))\n", "",
      ("tests/test_serve_fusion.py::test_an_uploaded_lora_is_checked_and_rewritten_where_torch_is",
       "tests/test_reliability_serve.py::test_http_bad_input_corpus"), slow=True),
]


def _repo_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (what a clean checkout plus your edits holds)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                             capture_output=True).stdout
        return [Path(p) for p in out.decode().split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the usual caches
        return [p.relative_to(root) for p in root.rglob("*")
                if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts)]


def _copy_repo(dest: Path) -> None:
    for rel in _repo_files(ROOT):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    | " + line for line in text.strip().splitlines()[-lines:])


def _summary_line(output: str) -> str:
    """pytest's last line ("1 failed, 3 passed in 12.3s")."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\b(\d+ (passed|failed|errors?|skipped|xfailed|deselected)\b.* in [\d.]+s|no tests ran)", line):
            return line.strip("= ").strip()
    return "no pytest summary"


def run_one(m: Mutation, timeout: float, clean: bool = False, verbose: bool = False) -> tuple[str, str]:
    """(outcome, detail) for one mutation: caught | MISSED | stale | error (or passed | FAILED with clean)."""
    source = ROOT / m.file
    if not source.is_file():
        return "stale", f"{m.file} does not exist"
    text = source.read_text()
    if m.old not in text:
        return "stale", f"old text not found in {m.file}"
    missing = [t for t in m.tests if not (ROOT / t.split("::")[0]).is_file()]
    if missing:
        return "stale", f"mapped test file(s) missing: {', '.join(missing)}"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        if not clean:
            (work / m.file).write_text(text.replace(m.old, m.new, 1))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(work), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "pytest", *m.tests, "-x", "-q", "-p", "no:cacheprovider"]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "error", f"timed out after {timeout:.0f} s"
        elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    summary = f"{_summary_line(output)}; {elapsed:.0f} s"
    if verbose:
        summary += "\n" + _tail(output)
    if proc.returncode == 5 or "not found:" in output:
        return "stale", f"a mapped test no longer exists ({summary})"
    if clean:
        return ("passed", summary) if proc.returncode == 0 else ("FAILED", summary + "\n" + _tail(output))
    if proc.returncode == 0:
        return "MISSED", summary
    if proc.returncode == 1:
        return "caught", summary
    if proc.returncode == 2 and "error" in summary:  # collection failed on the mutated code: it does not import
        return "caught", summary + " (at import)"
    return "error", f"pytest exited {proc.returncode} ({summary})\n" + _tail(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    parser.add_argument("--fast", action="store_true", help="only the mutations mapped to unit tests")
    parser.add_argument("--clean", action="store_true", help="run the mapped tests without the mutation")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutation (default 1200)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the tail of pytest's output")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    chosen = [m for m in MUTATIONS if (not args.only or m.name in args.only) and (not args.fast or not m.slow)]
    width = max(len(m.name) for m in MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name:<{width}}  {'slow' if m.slow else 'fast'}  {m.file}: {m.what}")
            print(f"{'':<{width}}        tests: {' '.join(m.tests)}")
        print(f"{len(chosen)} mutations")
        return 0

    print(f"mutation check of {ROOT} with {sys.executable} ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    counts: dict[str, int] = {}
    for m in chosen:
        outcome, detail = run_one(m, args.timeout, clean=args.clean, verbose=args.verbose)
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{outcome:<7} {m.name:<{width}}  {m.file}: {m.what}\n{'':<8}{detail}", flush=True)
    order = ("passed", "FAILED") if args.clean else ("caught", "MISSED", "stale", "error")
    print("summary: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order) + f" of {len(chosen)}")
    bad = ("FAILED",) if args.clean else ("MISSED", "error")
    return 1 if any(counts.get(k) for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
