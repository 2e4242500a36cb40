;; Payments portion: the credential-bearing half of a checkout.
;;
;; Runs inside a bubble. Uses two credentials it can never read:
;;   tokenization_key  HMAC-SHA256 key for card tokens
;;   gateway_key       Ed25519 seed of the payment gateway signing key
;;
;; tokenize:    input = card number (12..19 ASCII digits)
;;              output = HMAC-SHA256(tokenization_key, input)   (32 bytes)
;; sign_charge: input = [amount in cents u64 LE][charge request bytes]
;;              output = Ed25519(gateway_key, input)             (64 bytes)
;;              refused (status 3) when the amount exceeds the limit.
;; authorize_capture: input = [amount in cents u64 LE][order id: 1..48 bytes
;;              of A-Z a-z 0-9 . _ : -]. Signs the authorisation
;;              (Ed25519(gateway_key, input)), then awaits the gateway's
;;              capture notification: the event whose key is the order id
;;              (24 h; the bubble is frozen meanwhile and may be resumed by
;;              another broker), then signs the settlement
;;              (Ed25519(gateway_key, input ‖ notification), notification
;;              ≤ 64 bytes). output = authorisation (64) ‖ settlement (64);
;;              refused (3) over the limit, (4) when no capture came in time.
(module
  (import "bubble_v1" "input_len" (func $input_len (result i32)))
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "bubble_v1" "hmac_sha256" (func $hmac (param i32 i32 i32 i32 i32) (result i32)))
  (import "bubble_v1" "ed25519_sign" (func $sign (param i32 i32 i32 i32 i32) (result i32)))
  (import "bubble_v1" "await_event" (func $await_event (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "tokenization_key")
  (data (i32.const 16) "gateway_key")
  ;; Largest charge this portion signs: 1000.00 in cents.
  (global $limit i64 (i64.const 100000))

  (func $digits (param $p i32) (param $n i32) (result i32)
    (local $i i32) (local $c i32)
    (block $bad
      (loop $next
        (br_if 1 (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
        (br_if $bad (i32.lt_u (local.get $c) (i32.const 48)))
        (br_if $bad (i32.gt_u (local.get $c) (i32.const 57)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.eq (local.get $i) (local.get $n)))

  (func (export "tokenize") (result i32)
    (local $n i32)
    (local.set $n (call $input_len))
    (if (i32.or (i32.lt_s (local.get $n) (i32.const 12)) (i32.gt_s (local.get $n) (i32.const 19)))
      (then (return (i32.const 1))))
    (drop (call $input_read (i32.const 1024) (local.get $n)))
    (if (i32.eqz (call $digits (i32.const 1024) (local.get $n)))
      (then (return (i32.const 1))))
    (if (i32.ne (call $hmac (i32.const 0) (i32.const 16) (i32.const 1024) (local.get $n) (i32.const 8192)) (i32.const 0))
      (then (return (i32.const 2))))
    (drop (call $output_write (i32.const 8192) (i32.const 32)))
    (i32.const 0))

  (func (export "sign_charge") (result i32)
    (local $n i32)
    (local.set $n (call $input_len))
    (if (i32.or (i32.lt_s (local.get $n) (i32.const 8)) (i32.gt_s (local.get $n) (i32.const 4096)))
      (then (return (i32.const 1))))
    (drop (call $input_read (i32.const 1024) (local.get $n)))
    (if (i64.gt_u (i64.load (i32.const 1024)) (global.get $limit))
      (then (return (i32.const 3))))
    (if (i32.ne (call $sign (i32.const 16) (i32.const 11) (i32.const 1024) (local.get $n) (i32.const 8192)) (i32.const 0))
      (then (return (i32.const 2))))
    (drop (call $output_write (i32.const 8192) (i32.const 64)))
    (i32.const 0))

  (func (export "authorize_capture") (result i32)
    (local $n i32) (local $r i32)
    (local.set $n (call $input_len))
    (if (i32.or (i32.lt_s (local.get $n) (i32.const 9)) (i32.gt_s (local.get $n) (i32.const 56)))
      (then (return (i32.const 1))))
    (drop (call $input_read (i32.const 1024) (local.get $n)))
    (if (i64.gt_u (i64.load (i32.const 1024)) (global.get $limit))
      (then (return (i32.const 3))))
    (if (i32.ne (call $sign (i32.const 16) (i32.const 11) (i32.const 1024) (local.get $n) (i32.const 8192)) (i32.const 0))
      (then (return (i32.const 2))))
    (drop (call $output_write (i32.const 8192) (i32.const 64)))
    ;; The notification lands right after the input: the settlement signs both.
    (local.set $r (call $await_event (i32.const 1032) (i32.sub (local.get $n) (i32.const 8))
                        (i32.const 86400000) (i32.add (i32.const 1024) (local.get $n)) (i32.const 64)))
    (if (i32.eq (local.get $r) (i32.const -4)) (then (return (i32.const 4))))
    (if (i32.lt_s (local.get $r) (i32.const 0)) (then (return (i32.const 1))))
    (if (i32.ne (call $sign (i32.const 16) (i32.const 11) (i32.const 1024)
                          (i32.add (local.get $n) (local.get $r)) (i32.const 8192)) (i32.const 0))
      (then (return (i32.const 2))))
    (drop (call $output_write (i32.const 8192) (i32.const 64)))
    (i32.const 0))
)
