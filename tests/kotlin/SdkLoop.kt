// The Kotlin binding and the mobile demo's logic (DemoController) driving the
// real engine on the default model: the loop an Android app runs. Built and
// run by scripts/kotlin.sh; exits non-zero on the first failed check.
//
// usage: SdkLoopKt MODEL.gguf DEMO_USERS.jsonl WORK_DIR
package org.nextquill.test

import java.io.File
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess
import kotlinx.serialization.json.Json
import kotlinx.serialization.json.jsonArray
import kotlinx.serialization.json.jsonObject
import kotlinx.serialization.json.jsonPrimitive
import org.nextquill.Flow
import org.nextquill.FinishReason
import org.nextquill.NextquillEngine
import org.nextquill.NextquillException
import org.nextquill.TextListener
import org.nextquill.TrainOptions
import org.nextquill.TrainOutcome
import org.nextquill.callbackSelfTest
import org.nextquill.demo.core.DemoController
import org.nextquill.demo.core.TrainingProgress

private var passed = 0

private fun check(what: String, ok: Boolean, detail: () -> Any? = { null }) {
    if (!ok) {
        System.err.println("FAILED: $what ${detail() ?: ""}")
        println("kotlin sdk loop: $passed passed, 1 failed")
        exitProcess(1)
    }
    passed++
    println("ok  $what")
}

private inline fun <reified E : Throwable> throws(block: () -> Unit): E? =
    try {
        block()
        null
    } catch (e: Throwable) {
        e as? E ?: throw e
    }

fun main(args: Array<String>) {
    val (model, demoUsers, work) = args
    File(work).mkdirs()
    val jsonl = File(demoUsers).readText()

    // 10,000 callbacks from a Rust thread, in order, none on the caller's thread.
    val pieces = ArrayList<String>()
    val threads = HashSet<Long>()
    val started = System.nanoTime()
    val report = callbackSelfTest(10_000u, object : TextListener {
        override fun onText(text: String): Flow {
            pieces.add(text)
            threads.add(Thread.currentThread().id)
            return Flow.CONTINUE
        }
    })
    val millis = (System.nanoTime() - started) / 1e6
    println("10,000 callbacks from a Rust thread: ${"%.0f".format(millis)} ms")
    check("every callback arrived, in order", report.delivered == 10_000UL &&
        pieces == (0 until 10_000).map { "piece $it · ü · 語 · 🙂\n" })
    // JNA attaches the Rust thread to the JVM per callback, so the Java thread
    // ids may differ between calls; none may be the caller's.
    check("callbacks came from a background thread",
        report.fromBackgroundThread && Thread.currentThread().id !in threads) { threads.size }

    // A missing model is a typed exception that names the file.
    val missing = "$work/none.gguf"
    val modelError = throws<NextquillException.Model> {
        NextquillEngine.open("$work/x.sqlite3", missing, org.nextquill.EngineConfig())
    }
    check("a missing model is NextquillException.Model naming it",
        modelError?.message?.contains(missing) == true) { modelError }

    DemoController.open("$work/history.sqlite3", model).use { demo ->
        val seeded = demo.seedIfEmpty(jsonl)
        check("the made-up users import", seeded != null && seeded.imported == 24UL && seeded.badLines.isEmpty())
        check("a second seeding leaves the store alone", demo.seedIfEmpty(jsonl) == null)
        check("three users", demo.users().map { it.userId } == listOf("ava", "ben", "cleo"))

        // The heatmap of cleo's newest text: cells spell the text, Δp scaled into [-1, 1].
        val newest = demo.history("cleo").last()
        val heatmap = demo.heatmap("cleo", newest.itemId)
        val explanation = demo.engine.explain("cleo", newest.itemId)
        check("heatmap cells spell the start of the text",
            heatmap.cells.isNotEmpty() && newest.text.startsWith(heatmap.cells.joinToString("") { it.text }))
        check("heatmap holds the engine's effects",
            heatmap.cells.map { it.deltaP } == explanation.tokens.map { it.deltaP } &&
                heatmap.cells.all { it.intensity in -1f..1f } &&
                heatmap.cells.any { kotlin.math.abs(it.intensity) == 1f })
        check("weights sum to 1",
            kotlin.math.abs(explanation.tokens.map { it.weight.toDouble() }.sum() - 1.0) < 1e-4)

        // "Personalize now": two steps with progress, the adapter becomes active.
        val progress = ArrayList<TrainingProgress>()
        val trained = demo.personalize("cleo", TrainOptions(latestItems = 2u, learningRate = 1e-3, warmupSteps = 1u)) {
            progress.add(it)
        }
        println("trained: ${trained.outcome}, ${trained.steps} steps, loss ${trained.firstLoss} -> ${trained.lastLoss}, ${"%.1f".format(trained.seconds)} s")
        check("training activates the adapter", trained.outcome == TrainOutcome.ACTIVATED && trained.steps == 2UL)
        check("progress goes 1/2, 2/2", progress.map { it.fraction } == listOf(0.5f, 1.0f))
        check("one active adapter, v1", demo.engine.adapters("cleo").map { it.version to it.active } == listOf(1L to true))

        // The cancel button, pressed from another thread while training runs.
        val firstStep = CountDownLatch(1)
        var stopped: org.nextquill.TrainResult? = null
        val worker = Thread {
            stopped = demo.personalize("cleo", TrainOptions(latestItems = 3u, learningRate = 1e-3, warmupSteps = 1u)) {
                firstStep.countDown()
            }
        }
        worker.start()
        check("a training step within 10 minutes", firstStep.await(10, TimeUnit.MINUTES))
        demo.cancelTraining()
        worker.join()
        check("a cancelled run is STOPPED before its end",
            stopped?.outcome == TrainOutcome.STOPPED && stopped!!.steps < 3UL && stopped!!.adapter == null) { stopped }
        check("the first adapter stays active",
            demo.engine.adapters("cleo").map { it.version to it.active } == listOf(1L to true))

        // Generic next to personalized, both streamed.
        val genericPieces = ArrayList<String>()
        val personalPieces = ArrayList<String>()
        val request = "Category: Kitchen\nProduct: Electric kettle 1.7 litre\nRating: 5/5\nReview title: Boils fast"
        val comparison = demo.compare("cleo", request, 40u, { genericPieces.add(it) }, { personalPieces.add(it) })
        println("generic:      ${comparison.generic.text}")
        println("personalized: ${comparison.personalized.text}")
        check("streamed pieces add up to each text",
            genericPieces.joinToString("") == comparison.generic.text &&
                personalPieces.joinToString("") == comparison.personalized.text &&
                comparison.generic.tokens > 0UL && comparison.personalized.tokens > 0UL)
        check("no piece holds a broken character",
            (genericPieces + personalPieces).all { it.isNotEmpty() && '\uFFFD' !in it })
        check("generation ends for a reason",
            comparison.generic.finish in setOf(FinishReason.END_OF_TEXT, FinishReason.MAX_TOKENS))
        check("the personalized prompt holds the history",
            comparison.personalized.promptTokens > comparison.generic.promptTokens)

        // Export, then forget: nothing of cleo is left.
        val exported = Json.parseToJsonElement(demo.engine.exportUser("cleo")).jsonObject
        check("export holds cleo's texts",
            exported["user_id"]?.jsonPrimitive?.content == "cleo" && exported["history"]?.jsonArray?.size == 8)
        val adapterPath = demo.engine.adapters("cleo").single().path
        val forgot = demo.engine.forget("cleo")
        check("forget removes items and adapters", forgot.items == 8UL && forgot.adapters == 1UL && !File(adapterPath).exists())
        val gone = throws<NextquillException.UnknownUser> { demo.history("cleo") }
        check("a forgotten user is NextquillException.UnknownUser", gone != null) { gone }
        check("the other users stay", demo.users().map { it.userId } == listOf("ava", "ben"))
    }
    println("kotlin sdk loop: $passed passed, 0 failed")
}
